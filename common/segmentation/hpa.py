"""The HPA-Cell-Segmentation backend: its nucleus and cell U-Nets, then the shared labelling step.

Install (not in requirements.txt: it needs PyTorch, which the rest of the toolkit does not):
`pip install torch` (any build for your GPU) and
`pip install "git+https://github.com/CellProfiling/HPA-Cell-Segmentation.git"`; the model files
(`dpn_unet_nuclei_v1.pth`, `dpn_unet_cell_3ch_v1.pth`) are on Zenodo, record 4665863
(https://zenodo.org/record/4665863). Offline (Kaggle), attach both as a dataset.

The model files are whole pickled PyTorch modules: loading them runs code from the file. They
are only loaded when the caller says so (`trust_model_files=True`, CLI `--trust-model-files`).

Pre- and post-processing follow hpacellseg (read from its cellsegmentator.py / utils.py):
- input scaled to [0, 1] by the dtype's full range and shrunk by `scale_factor` (0.25);
- nucleus net input: blue repeated in 3 channels; cell net input: (red, yellow, blue), the
  order of hpacellseg's 3-channel model (microtubules, ER, nuclei);
- normalisation `(x - mean) / std`, mean = (124, 117, 104) / 255, std = 1 / (0.0167 * 255);
- padding: the U-Nets need sides that are multiples of 32 (1728 px * 0.25 = 432 is not: this is
  where hpacellseg crashes unpadded); we reflect-pad 32 px on every side, then up to a
  multiple of 32, and crop the prediction back;
- output: softmax over 3 classes per pixel, (background, boundary, interior).
The maps handed to the labelling step are `interior * (1 - boundary)` for nuclei and cells, at
the network's resolution; labelling thresholds come from `LABEL_PARAMS` (hpacellseg uses 0.4 on
nuclei and max(0.22, Otsu / 2) on cells).

Networks are plain callables `batch (N, 3, H, W) float32 -> (N, 3, H, W) probabilities`, so
tests run exactly this code with a stand-in; `load_networks` wraps the real torch modules.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from common.segmentation import labelling
from common.segmentation.classical import to_unit

MEAN = np.array([124 / 255, 117 / 255, 104 / 255], np.float32)
STD = np.float32(1 / (0.0167 * 255))
MULTIPLE = 32  # the U-Nets downsample 5 times
MARGIN = 32  # reflect padding on every side, so borders are seen with context
SCALE_FACTOR = 0.25  # hpacellseg's default: 2048 px -> 512 px
CELL_CHANNELS = (0, 3, 2)  # (red, yellow, blue) of an R, G, B, Y image
BACKGROUND, BOUNDARY, INTERIOR = 0, 1, 2

# The networks draw boundaries between touching objects, so little extra splitting or
# distance-based cutting is needed; thresholds as in hpacellseg.
LABEL_PARAMS = labelling.LabelParams(
    nucleus_threshold=0.4, cell_threshold=0.25, split_depth=24.0, distance_weight=0.1,
    max_cell_extent=None,
)

Network = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Networks:
    """The two U-Nets as callables; `cell` may be None for nuclei-only use."""

    nuclei: Network
    cell: Network | None = None


def padded_size(n: int) -> int:
    """Side after padding: `MARGIN` on both ends, then up to a multiple of `MULTIPLE`."""
    return -(-(n + 2 * MARGIN) // MULTIPLE) * MULTIPLE


def pad(x: np.ndarray) -> np.ndarray:
    """`hxwxC` -> reflect-padded `HxWxC` (see `padded_size`); content starts at (MARGIN, MARGIN)."""
    h, w = x.shape[:2]
    out = cv2.copyMakeBorder(x, MARGIN, padded_size(h) - h - MARGIN, MARGIN,
                             padded_size(w) - w - MARGIN, cv2.BORDER_REFLECT)
    return out.reshape(out.shape[:2] + x.shape[2:])


def network_inputs(image: np.ndarray, nuclei_only: bool = False, scale_factor: float = SCALE_FACTOR):
    """`HxWx4` image (or `HxW` blue with nuclei_only) -> (nuclei input, cell input or None, size).

    Inputs are normalised `3xH'xW'` float32 arrays, padded; `size` = (h, w) of the scaled image
    before padding.
    """
    image = np.asarray(image)
    if image.ndim == 2 and nuclei_only:
        image = image[..., None]
        blue, cell_idx = 0, None
    elif image.ndim == 3 and image.shape[-1] == 4:
        blue, cell_idx = 2, CELL_CHANNELS
    else:
        raise ValueError(f"expected an HxWx4 image (R, G, B, Y), got shape {image.shape}")
    h, w = image.shape[:2]
    size = (max(1, int(round(h * scale_factor))), max(1, int(round(w * scale_factor))))

    def plane(i):
        return labelling.resize_map(to_unit(image[..., i]), size)

    def prepare(planes):
        x = np.stack(planes, axis=-1)
        x = (x - MEAN) / STD
        return pad(x.astype(np.float32)).transpose(2, 0, 1)

    b = plane(blue)
    nuc_in = prepare([b, b, b])
    cell_in = None
    if not nuclei_only:
        cell_in = prepare([plane(cell_idx[0]), plane(cell_idx[1]), b])
    return nuc_in, cell_in, size


def run_network(net: Network, inputs: Sequence[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
    """Run `net` over `3xHxW` inputs in batches of equal-sized inputs; returns `3xHxW` outputs."""
    outputs: list[np.ndarray | None] = [None] * len(inputs)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(x.shape, []).append(i)
    for shape, idx in groups.items():
        for k in range(0, len(idx), batch_size):
            part = idx[k:k + batch_size]
            batch = np.stack([inputs[i] for i in part]).astype(np.float32)
            out = np.asarray(net(batch))
            if out.shape != (len(part), 3) + shape[1:]:
                raise ValueError(f"segmentation network returned shape {out.shape} for input "
                                 f"{batch.shape}; expected {(len(part), 3) + shape[1:]}")
            for j, i in enumerate(part):
                outputs[i] = out[j]
    return outputs  # type: ignore[return-value]


def _to_map(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop the padding off a `3xHxW` prediction; `interior * (1 - boundary)`, float32 [0, 1]."""
    h, w = size
    p = pred[:, MARGIN:MARGIN + h, MARGIN:MARGIN + w].astype(np.float32)
    return np.clip(p[INTERIOR] * (1.0 - p[BOUNDARY]), 0.0, 1.0)


def probability_maps_batch(images: Sequence[np.ndarray], networks: Networks | None = None,
                           nuclei_only: bool = False, scale_factor: float = SCALE_FACTOR,
                           batch_size: int = 4, nuclei_net: Network | None = None,
                           cell_net: Network | None = None):
    """Many images -> [(nucleus map, cell map or None)] at the networks' resolution, batched."""
    if networks is None:
        if nuclei_net is None:
            raise ValueError("the hpa backend needs its networks: pass networks=load_networks(...) "
                             "or nuclei_net=/cell_net= callables")
        networks = Networks(nuclei=nuclei_net, cell=cell_net)
    if not nuclei_only and networks.cell is None:
        raise ValueError("the hpa backend needs a cell network unless nuclei_only=True")
    prepared = [network_inputs(im, nuclei_only, scale_factor) for im in images]
    nuc_out = run_network(networks.nuclei, [p[0] for p in prepared], batch_size)
    cell_out = [None] * len(prepared)
    if not nuclei_only:
        cell_out = run_network(networks.cell, [p[1] for p in prepared], batch_size)
    result = []
    for (_, _, size), n, c in zip(prepared, nuc_out, cell_out):
        result.append((_to_map(n, size), None if c is None else _to_map(c, size)))
    return result


def probability_maps(image: np.ndarray, nuclei_only: bool = False, **options):
    """One image -> (nucleus map, cell map or None); options as in `probability_maps_batch`."""
    return probability_maps_batch([image], nuclei_only=nuclei_only, **options)[0]


def check_model_files(nuclei_model: str | None, cell_model: str | None, trust_model_files: bool) -> None:
    """Refuse, without loading anything, what `load_networks` could not load: a model file not
    given or not found, loading not allowed (`trust_model_files`), PyTorch or hpacellseg not
    installed. Raises ValueError naming the CLI flag or what is missing."""
    import importlib.util
    import os

    missing = [flag for flag, value in (("--nuclei-model", nuclei_model), ("--cell-model", cell_model))
               if not value]
    if missing:
        raise ValueError(f"needs hpacellseg's model files: give {' and '.join(missing)} "
                         "(dpn_unet_nuclei_v1.pth, dpn_unet_cell_3ch_v1.pth; see common/segmentation/hpa.py)")
    absent = [path for path in (nuclei_model, cell_model) if not os.path.isfile(path)]
    if absent:
        raise ValueError(f"model file(s) not found: {', '.join(absent)}")
    if not trust_model_files:
        raise ValueError("the model files are pickled PyTorch modules and loading them runs code "
                         f"from them; pass --trust-model-files if you trust {nuclei_model} and {cell_model}")
    modules = [name for name in ("torch", "hpacellseg") if importlib.util.find_spec(name) is None]
    if modules:
        raise ValueError(f"needs {' and '.join(modules)}, not installed here; "
                         "see common/segmentation/hpa.py for how to install them")


def load_networks(nuclei_model: str, cell_model: str | None = None, trust_model_files: bool = False,
                  device: str | None = None) -> Networks:
    """Load hpacellseg's model files (`.pth`) as `Networks`, on the GPU when there is one.

    The files are pickled PyTorch modules: unpickling runs code from them, so this refuses
    unless `trust_model_files=True`. device: "cuda", "cuda:N", "cpu", or None = cuda if
    available. A requested cuda device that is absent raises instead of falling back.
    """
    if not trust_model_files:
        raise PermissionError(
            f"refusing to load {nuclei_model}: hpacellseg model files are pickled PyTorch "
            "modules and loading them runs code from the file. Pass trust_model_files=True "
            "(CLI: --trust-model-files) only for files from a source you trust (Zenodo 4665863)")
    try:
        import torch
        import hpacellseg  # noqa: F401  # its classes must be importable to unpickle the models
    except ImportError as err:
        raise ImportError(f"the hpa backend needs PyTorch and hpacellseg ({err}); see "
                          "common/segmentation/hpa.py for how to install them") from err
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but PyTorch sees no CUDA GPU")

    def load(path):
        import os

        if not os.path.isfile(path):
            raise FileNotFoundError(f"hpacellseg model file not found: {path}")
        model = torch.load(path, map_location=torch.device(device), weights_only=False)
        if isinstance(model, torch.nn.DataParallel):
            model = model.module
        model = model.to(device).eval()

        def net(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
                return torch.softmax(model(x), dim=1).float().cpu().numpy()

        return net

    return Networks(nuclei=load(nuclei_model), cell=load(cell_model) if cell_model else None)


@functools.lru_cache(maxsize=2)
def shared_networks(nuclei_model: str, cell_model: str | None = None, trust_model_files: bool = False,
                    device: str | None = None) -> Networks:
    """`load_networks`, once per process for the same arguments: every image a builder worker,
    predict's reader threads or `segment` segments uses the same loaded U-Nets."""
    return load_networks(nuclei_model, cell_model, trust_model_files=trust_model_files, device=device)
