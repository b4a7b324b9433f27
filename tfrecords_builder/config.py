"""BuildConfig: everything that decides what a build writes, frozen, saved into the manifest."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common import config as cfglib
from common.preprocess import TileSpec

DEFAULT_SIZE = {"image": 512, "cell": 224, "bag": 224}  # tile side (px) when --size is not given

# Fields that change how fast a build runs, not what it writes: a resume may change them.
RUNTIME_FIELDS = ("workers", "trust_model_files", "engine")

PRESETS: dict[str, dict] = {
    # The full competition build: 512 px images or 224 px cells, 5 folds, ~100 MB shards.
    "default": {},
    # Seconds on a CPU: tiny tiles and shards, a few images (tests, CI, the demo).
    "smoke": {"size": 64, "folds": 2, "shard_mb": 0.05, "limit": 8, "workers": 1},
}


@dataclass(frozen=True)
class BuildConfig:
    """One TFRecord build. Paths are local folders/files or `gs://` URLs."""

    images: tuple[str, ...] = ()  # image folder(s): one for all label lists, or one per list
    labels: tuple[str, ...] = ()  # label CSVs (`ID,Label[,...]`), read in order
    out: str = ""  # output folder or gs://bucket/prefix
    mode: str = "image"  # "image": one example per image; "cell": one per cell; "bag": one per image holding its cells
    size: int = 0  # tile side, px; 0 = DEFAULT_SIZE[mode]
    folds: int = 5  # K of the multilabel-stratified K folds
    shard_mb: float = 100.0  # target shard size, MB (10^6 bytes)
    workers: int = 1  # decoding processes; 0 = decode in the main process
    segmenter: str = "default"  # cell mode without --masks: common.segmentation backend
    nuclei_model: str = ""  # segmenter "hpa": hpacellseg's nucleus model file (.pth)
    cell_model: str = ""  # segmenter "hpa": hpacellseg's 3-channel cell model file (.pth)
    trust_model_files: bool = False  # segmenter "hpa": allow unpickling those files
    masks: str = ""  # cell mode: folder of `{ID}_cells.png` (+ `{ID}_nuclei.png`); skips segmenting
    limit: int = 0  # use only the first N usable images (0 = all)
    seed: int = 0  # fold assignment and shard order
    margin: float = 0.0  # cell mode: widen each box by this fraction of its longer side
    mask_outside: bool = True  # cell mode: zero pixels outside the cell
    interpolation: str = "area"  # resize: "area", "linear" or "nearest"
    max_cells: int = 16  # bag mode: most cells per record; an image with more keeps a seeded choice
    engine: str = "local"  # "local": this machine's processes; "beam": an Apache Beam pipeline

    def __post_init__(self):
        if self.mode not in DEFAULT_SIZE:
            raise ValueError(f"mode must be 'image', 'cell' or 'bag', got {self.mode!r}")
        if self.max_cells < 1:
            raise ValueError(f"max_cells must be >= 1, got {self.max_cells}")
        if not self.size:
            object.__setattr__(self, "size", DEFAULT_SIZE[self.mode])
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "labels", tuple(self.labels))
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
        if self.engine not in ("local", "beam"):
            raise ValueError(f"engine must be 'local' or 'beam', got {self.engine!r}")
        if self.segmenter not in ("default", "hpa"):
            raise ValueError(f"segmenter must be 'default' or 'hpa', got {self.segmenter!r}")
        self.tile_spec()  # validates size, margin, interpolation

    def tile_spec(self) -> TileSpec:
        """The TileSpec every tile is cut with; written to the output as `preprocess.json`."""
        bag = self.mode == "bag"
        return TileSpec(size=self.size, mode="cell" if bag else self.mode, mask_outside=self.mask_outside,
                        margin=self.margin, interpolation=self.interpolation,
                        bag=self.max_cells if bag else 0)

    def image_source(self, list_index: int) -> str:
        """Image folder of the `list_index`-th label list."""
        return self.images[0] if len(self.images) == 1 else self.images[list_index]

    def content_dict(self) -> dict:
        """The config without the runtime-only fields: two builds with equal dicts write equal files."""
        d = cfglib.to_dict(self)
        for key in RUNTIME_FIELDS:
            d.pop(key)
        return d


def make_config(preset: str = "default", **overrides) -> BuildConfig:
    """A preset with overrides (None values ignored), validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("images", "labels"):
        if isinstance(values.get(key), str):
            values[key] = (values[key],)
    return cfglib.from_dict(BuildConfig, values)


def replace(cfg: BuildConfig, **changes) -> BuildConfig:
    return dataclasses.replace(cfg, **changes)
