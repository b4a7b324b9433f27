"""BuildConfig: everything that decides what a build writes, frozen, saved into the manifest."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common import config as cfglib
from common.preprocess import Preprocess, TileSpec
from common.segmentation import WORK_SIZE

DEFAULT_SIZE = {"image": 512, "cell": 224, "bag": 224}  # tile side (px) when --size is not given
ENGINES = ("local", "beam")
SEGMENTERS = ("default", "hpa")
INTERPOLATIONS = ("area", "linear", "nearest")  # common.preprocess's resize filters

# Fields that change how fast a build runs, not what it writes: a resume may change them. And
# the cell-labels path: its bytes decide what is written, compared by their fingerprint
# (tfrecords_builder.cell_targets), so a table moved elsewhere still resumes.
RUNTIME_FIELDS = ("workers", "trust_model_files", "engine", "cell_labels")


@dataclass(frozen=True)
class BuildConfig:
    """One TFRecord build. Paths are local folders/files or `gs://` URLs.

    Without its inputs (images, labels, out) a BuildConfig is a preset: its values are checked,
    and size 0 stays "the mode's default" until the inputs come (then a later --mode still picks
    its own default size). With them, every input is required and size is filled in.
    The comments are the command line's --help (common.config.add_arguments).
    """

    # folder or gs:// prefix of {ID}_{red,green,blue,yellow}.{png,tif.gz,jpg,...}:
    # once for all label lists, or once per --labels in the same order
    images: tuple[str, ...] = ()
    # label list with ID,Label columns (train.csv, public_hpa_labels.csv, ...); repeatable,
    # read in order
    labels: tuple[str, ...] = ()
    out: str = ""  # output folder or gs://bucket/prefix for shards, preprocess.json, manifest.json
    # image: one example per whole image; cell: one per segmented cell, with the image's labels;
    # bag: one example per image holding up to --max-cells of its cells (the MIL recipe)
    mode: str = "image"
    size: int = 0  # tile side in pixels; 0 = 512 in image mode, 224 in cell and bag modes
    folds: int = 5  # number K of multilabel-stratified folds
    # what must not straddle folds. auto: from each ID, {plate}_{well}_{field} -> the well,
    # {antibody}_{plate}_{well}_{field} -> the antibody, any other ID (competition UUIDs) -> the
    # image; image: each image by itself (the folds of builds before --group-by); any other
    # value: a column of the label list(s) (e.g. Antibody), whose value names the group
    group_by: str = "auto"
    # target shard size in MB (10^6 bytes); shard counts are planned from a pilot of 8 images
    shard_mb: float = 100.0
    workers: int = 1  # decoding processes; 0 decodes in the main process
    segmenter: str = "default"  # cell mode without --masks: the common.segmentation backend
    # cell and bag modes without --masks: long side in px of the segmentation's working
    # resolution, as predict's --work-size (recorded in preprocess.json, so predict follows it)
    work_size: int = WORK_SIZE
    nuclei_model: str = ""  # --segmenter hpa: hpacellseg's nucleus model file (.pth), as for predict
    cell_model: str = ""  # --segmenter hpa: hpacellseg's 3-channel cell model file (.pth)
    # --segmenter hpa: allow loading the .pth files, which are pickled PyTorch modules (loading
    # runs code from them): only for files you trust
    trust_model_files: bool = False
    # cell mode: use precomputed label maps {ID}_cells.png (+ optional {ID}_nuclei.png, same
    # ids) from this folder instead of segmenting
    masks: str = ""
    limit: int = 0  # use only the first N usable images; 0 = all
    seed: int = 0  # seed of the fold assignment and shard order
    margin: float = 0.0  # cell mode: widen each cell box by this fraction of its longer side
    # cell mode: zero the pixels outside the cell (--keep-outside keeps them)
    mask_outside: bool = True
    interpolation: str = "area"  # resize filter
    # bag mode: the most cells per record; an image with more keeps a choice seeded by --seed
    # and its ID (the record says how many cells it had)
    max_cells: int = 16
    # cell and bag modes: a cell-labels file (python -m infer_gpu pseudo-label; local or gs://)
    # made with the same segmentation: each cell's record also carries its soft targets
    # (cell_targets), a cell the table lacks its image's labels; counts in manifest.json
    cell_labels: str = ""
    # local: this machine's worker processes; beam: an Apache Beam pipeline (pip install
    # hpa-scc[beam]) over the same plan and per-image function, giving the same shards. With
    # beam, options the builder does not know go to Beam, e.g. --runner DataflowRunner
    # --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py (default
    # runner: DirectRunner, with --workers processes)
    engine: str = "local"

    def __post_init__(self):
        if self.mode not in DEFAULT_SIZE:
            raise ValueError(f"mode must be 'image', 'cell' or 'bag', got {self.mode!r}")
        if self.max_cells < 1:
            raise ValueError(f"max_cells must be >= 1, got {self.max_cells}")
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.images or self.labels or self.out:  # a build, not a preset
            if not self.size:
                object.__setattr__(self, "size", DEFAULT_SIZE[self.mode])
            if not self.labels:
                raise ValueError("at least one label CSV (--labels) is needed")
            if not self.images:
                raise ValueError("an image folder (--images) is needed")
            if len(self.images) not in (1, len(self.labels)):
                raise ValueError(
                    f"give one --images for all label lists or one per --labels; got {len(self.images)} "
                    f"image folders for {len(self.labels)} label lists"
                )
            if not self.out:
                raise ValueError("an output folder (--out) is needed")
        if self.folds < 1:
            raise ValueError(f"folds must be >= 1, got {self.folds}")
        if self.shard_mb <= 0:
            raise ValueError(f"shard_mb must be > 0, got {self.shard_mb}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be 'local' or 'beam', got {self.engine!r}")
        if not self.group_by.strip():
            raise ValueError("group_by must be 'auto', 'image' or a column of the label lists, got ''")
        if self.cell_labels and self.mode == "image":
            raise ValueError("--cell-labels needs --mode cell or bag (whole images have no cells)")
        if self.work_size < 1:
            raise ValueError(f"work_size must be >= 1, got {self.work_size}")
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter must be 'default' or 'hpa', got {self.segmenter!r}")
        self.preprocess()  # validates size, margin, interpolation

    def tile_spec(self) -> TileSpec:
        """The TileSpec every tile is cut with (a bag build's are cell tiles)."""
        return TileSpec(size=self.size or DEFAULT_SIZE[self.mode], mode="cell" if self.mode == "bag" else self.mode,
                        mask_outside=self.mask_outside, margin=self.margin, interpolation=self.interpolation)

    def preprocess(self) -> Preprocess:
        """The tile spec with the bag size (a bag build's `max_cells`, else 0); written to the
        output as `preprocess.json`, with the segmentation (`core.segmentation_spec`)."""
        return Preprocess(self.tile_spec(), bag=self.max_cells if self.mode == "bag" else 0)

    def image_source(self, list_index: int) -> str:
        """Image folder of the `list_index`-th label list."""
        return self.images[0] if len(self.images) == 1 else self.images[list_index]

    def content_dict(self) -> dict:
        """The config without the runtime-only fields: two builds with equal dicts write equal files."""
        d = cfglib.to_dict(self)
        for key in RUNTIME_FIELDS:
            d.pop(key)
        return d


PRESETS: dict[str, BuildConfig] = {
    # The full competition build: 512 px images or 224 px cells, 5 folds, ~100 MB shards.
    "default": BuildConfig(),
    # Seconds on a CPU: tiny tiles and shards, a few images (tests, CI, the demo).
    "smoke": BuildConfig(size=64, folds=2, shard_mb=0.05, limit=8, workers=1),
}


def make_config(preset: str = "default", **overrides) -> BuildConfig:
    """A preset with overrides (None values ignored), validated; one path may be a plain str."""
    for key in ("images", "labels"):
        if isinstance(overrides.get(key), str):
            overrides[key] = (overrides[key],)
    return cfglib.override(cfglib.preset(PRESETS, preset), **overrides)


def replace(cfg: BuildConfig, **changes) -> BuildConfig:
    return dataclasses.replace(cfg, **changes)
