"""Cell segmentation: `segment(image) -> Segmentation` with cell and nucleus label maps.

Backends turn an image into a nucleus and a cell probability map; the one labelling step
(`common.segmentation.labelling`) turns those into label maps at full resolution:

- "default" (`classical`): no weights, classical image processing; runs anywhere.
- "hpa" (`hpa`): the HPA-Cell-Segmentation U-Nets, when the user has `hpacellseg` and its
  model files; `backend_options` loads them (once per process) for the builder, predict and
  `segment` alike.

Both work at `WORK_SIZE` px on the long side unless told otherwise (`work_size`).
Label maps are `HxW int32`, 0 = background; a cell and its nucleus share the id; ids are 1..K.
Boxes are `(y0, x0, y1, x1)`, half-open, in full-resolution pixels (`cell_boxes` finds them).

`SegmentationSpec` records how a dataset's cells were segmented (stored in its `preprocess.json`,
see `common.preprocess.Preprocess.segmentation`, and copied into the run folder by the trainer);
`spec_for` is the one function that makes it from a segmenter's settings, for the builder and
for predict, which compares the two.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from common.segmentation.labelling import WORK_SIZE  # noqa: F401 - the one working size

BACKENDS = ("default", "hpa")
MASKS = "masks"  # SegmentationSpec.backend of a dataset cut from precomputed label maps (--masks)
# segment() options that change how fast it runs, not the masks it makes: not in the spec
_RUNTIME_OPTIONS = ("networks", "nuclei_net", "cell_net", "batch_size")


@dataclass(frozen=True)
class SegmentationSpec:
    """How cells were segmented: what must match for tiles cut at inference to be like training's."""

    backend: str = "default"  # "default", "hpa", or "masks" (precomputed label maps, not reproducible)
    work_size: int | None = WORK_SIZE  # long side in px of the labelling's working resolution; None = full
    # hpa: fingerprints (`common.storage.fingerprint`) of the nucleus and cell model files;
    # empty when the networks were passed in as objects (unknown)
    model_files: tuple[str, ...] = ()
    # other options given to `segment` that change the masks, as sorted (name, JSON text) pairs
    options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.backend not in (*BACKENDS, MASKS):
            raise ValueError(f"SegmentationSpec.backend must be one of {(*BACKENDS, MASKS)}, got {self.backend!r}")
        object.__setattr__(self, "model_files", tuple(self.model_files))
        object.__setattr__(self, "options", tuple(tuple(o) for o in self.options))

    def to_dict(self) -> dict:
        from common import config as cfglib

        return cfglib.to_dict(self)

    @classmethod
    def from_dict(cls, data) -> "SegmentationSpec":
        from common import config as cfglib

        return cfglib.from_dict(cls, data)

    def describe_difference(self, other: "SegmentationSpec", mine: str = "this",
                            theirs: str = "other") -> list[str]:
        """One line per differing field, naming it and both values, e.g.
        `work_size: 512 (training) vs 256 (predict)`; [] when equal."""
        return [f"{f.name}: {getattr(self, f.name)!r} ({mine}) vs {getattr(other, f.name)!r} ({theirs})"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def spec_for(backend: str = "default", work_size: int | None = WORK_SIZE, masks: bool = False,
             nuclei_model: str | None = None, cell_model: str | None = None,
             **options) -> SegmentationSpec:
    """The SegmentationSpec of a segmenter's settings (the builder's and predict's, the same way).

    backend, work_size, options: as `segment` takes them; masks: label maps were read, not made
    (backend "masks"); nuclei_model / cell_model: hpa's model files, fingerprinted (read once).
    """
    if masks:
        return SegmentationSpec(backend=MASKS, work_size=None)
    files = ()
    if backend == "hpa" and nuclei_model:
        from common import storage

        files = tuple(storage.fingerprint(storage.read_bytes(p)) for p in (nuclei_model, cell_model) if p)
    kept = tuple(sorted((k, _option_text(v)) for k, v in options.items() if k not in _RUNTIME_OPTIONS))
    return SegmentationSpec(backend=backend, work_size=work_size, model_files=files, options=kept)


def _option_text(value) -> str:
    import json

    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, default=repr)


def backend_options(backend: str = "default", nuclei_model: str | None = None, cell_model: str | None = None,
                    trust_model_files: bool = False, device: str | None = None,
                    nuclei_only: bool = False) -> dict:
    """The `segment` options that make a backend run, for the builder, predict and `segment`
    alike: {} for "default"; for "hpa" `networks`, the U-Nets loaded once per process
    (`hpa.shared_networks`). nuclei_model / cell_model: hpacellseg's model files (the cell
    model not needed with nuclei_only); device: as `hpa.load_networks` takes it.

    Raises ValueError when a model file is not given, and `hpa.load_networks`' errors
    (PermissionError without trust_model_files, ImportError, FileNotFoundError, RuntimeError).
    """
    if backend != "hpa":
        return {}
    if not nuclei_model or (not nuclei_only and not cell_model):
        needs = "--nuclei-model" + ("" if nuclei_only else " and --cell-model")
        raise ValueError(f"the hpa backend needs {needs} (hpacellseg's .pth files)")
    from common.segmentation import hpa

    return {"networks": hpa.shared_networks(nuclei_model, None if nuclei_only else cell_model,
                                            trust_model_files, device)}


@dataclass(frozen=True)
class CellInfo:
    """Facts about one cell: `area` in px, `bbox` (y0, x0, y1, x1) half-open, full resolution."""

    id: int
    area: int
    bbox: tuple[int, int, int, int]
    touches_border: bool
    has_nucleus: bool


@dataclass
class Segmentation:
    """Cell and nucleus label maps, `HxW int32` at the image's full resolution."""

    cells: np.ndarray
    nuclei: np.ndarray
    backend: str = "default"
    _info: list | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.cells.shape != self.nuclei.shape or self.cells.ndim != 2:
            raise ValueError(f"cells {self.cells.shape} and nuclei {self.nuclei.shape} must be equal HxW maps")

    @property
    def shape(self) -> tuple[int, int]:
        return self.cells.shape

    @property
    def num_cells(self) -> int:
        return len(self.cell_info())

    def cell_info(self) -> list[CellInfo]:
        """One CellInfo per cell id present, in id order (computed once, in one pass)."""
        if self._info is None:
            self._info = cell_info(self.cells, self.nuclei)
        return list(self._info)


def cell_boxes(label_map: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """`{cell_id: (y0, x0, y1, x1)}` for every id > 0 present in a label map (one pass); the
    one place boxes are found (`common.preprocess` cuts tiles from them)."""
    from scipy import ndimage

    boxes = {}
    for i, sl in enumerate(ndimage.find_objects(label_map), start=1):
        if sl is not None:
            boxes[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    return boxes


def cell_info(cells: np.ndarray, nuclei: np.ndarray) -> list[CellInfo]:
    """Per-cell area, box, border contact and nucleus presence of a label map pair."""
    h, w = cells.shape
    n = int(cells.max()) if cells.size else 0
    if n == 0:
        return []
    areas = np.bincount(cells.ravel(), minlength=n + 1)
    nuc_ids = np.unique(nuclei[(nuclei > 0) & (nuclei == cells)])
    has_nuc = np.zeros(n + 1, bool)
    has_nuc[nuc_ids] = True
    out = []
    for i, (y0, x0, y1, x1) in sorted(cell_boxes(cells).items()):
        out.append(CellInfo(
            id=i, area=int(areas[i]), bbox=(y0, x0, y1, x1),
            touches_border=bool(y0 == 0 or x0 == 0 or y1 == h or x1 == w),
            has_nucleus=bool(has_nuc[i]),
        ))
    return out


def segment(image: np.ndarray, backend: str = "default", nuclei_only: bool = False,
            work_size: int | None = WORK_SIZE, **options) -> Segmentation:
    """Segment one image into cells and nuclei.

    image: `HxWx4` (R, G, B, Y), uint8, uint16 or float in [0, 1], any size (square or not);
      with `nuclei_only`, only blue is read and `image` may also be the `HxW` blue channel.
    backend: "default" (classical, no weights) or "hpa" (U-Nets; pass `networks=` from
      `hpa.load_networks`, or `nuclei_net=`/`cell_net=` callables).
    nuclei_only: segment nuclei only; cells are the nuclei (grown by
      `LabelParams.nuclei_only_expand` reference px, default 0).
    work_size: long side in px of the labelling's working resolution; None = full resolution.
    options: `label_params=LabelParams(...)`, and per backend `params=ClassicalParams(...)`
      (default) or `scale_factor=`, `batch_size=` (hpa).
    Returns a Segmentation with full-resolution `HxW int32` maps.
    """
    return segment_batch([image], backend=backend, nuclei_only=nuclei_only, work_size=work_size,
                         **options)[0]


def segment_batch(images, backend: str = "default", nuclei_only: bool = False,
                  work_size: int | None = WORK_SIZE, **options) -> list[Segmentation]:
    """`segment` for a list of images; the hpa backend runs its networks in batches."""
    from common.segmentation import labelling

    images = [np.asarray(im) for im in images]
    for im in images:
        if im.ndim not in (2, 3) or im.shape[0] < 2 or im.shape[1] < 2:
            raise ValueError(f"expected an HxWx4 image (or HxW blue with nuclei_only), got shape {im.shape}")
    label_params = options.pop("label_params", None)
    if backend == "default":
        from common.segmentation import classical

        lp = label_params or labelling.LabelParams()
        params = options.pop("params", None)
        if options:
            raise TypeError(f"unexpected options for backend 'default': {sorted(options)}")
        maps = [classical.probability_maps(im, nuclei_only=nuclei_only, work_size=work_size, params=params)
                for im in images]
    elif backend == "hpa":
        from common.segmentation import hpa

        lp = label_params or hpa.LABEL_PARAMS
        maps = hpa.probability_maps_batch(images, nuclei_only=nuclei_only, **options)
    else:
        raise ValueError(f"unknown segmentation backend {backend!r}; choose one of {BACKENDS}")
    lp = lp.replace(work_size=work_size)
    out = []
    for im, (nuc, cell) in zip(images, maps):
        cells, nuclei = labelling.label(nuc, cell, im.shape[:2], lp)
        out.append(Segmentation(cells=cells, nuclei=nuclei, backend=backend))
    return out


def save_labels(path: str, label_map: np.ndarray) -> None:
    """Write a label map as a 16-bit PNG (local path or `gs://` URL, atomic); ids must be < 65536."""
    import cv2

    from common import storage

    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"{path}: a label map must be HxW, got shape {label_map.shape}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 65535):
        raise ValueError(f"{path}: label ids must be in [0, 65535] for a 16-bit PNG, "
                         f"got [{label_map.min()}, {label_map.max()}]")
    ok, buf = cv2.imencode(".png", label_map.astype(np.uint16))
    if not ok:
        raise ValueError(f"{path}: could not encode the label map as PNG")
    storage.write_bytes(path, buf.tobytes())


def load_labels(path: str) -> np.ndarray:
    """Read a label-map PNG (8- or 16-bit, one channel; local or `gs://`) as `HxW int32`.

    Raises FileNotFoundError when absent, ValueError naming the file when it is not a label map.
    """
    import cv2

    from common import storage

    data = storage.read_bytes(path)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{path}: corrupt or unreadable label map")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: a label map must be a 1-channel integer PNG, got {arr.shape} {arr.dtype}")
    return arr.astype(np.int32)
