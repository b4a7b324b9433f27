"""The default backend: nucleus and cell probability maps by classical image processing, no weights.

Channels: blue (nuclei) gives the nucleus map; red (microtubules) and yellow (ER), with blue
added because a nucleus is inside its cell, give the cell map. For each channel:

1. scale to [0, 1] by its dtype's full range (uint8 / 255, uint16 / 65535, float as is) and
   shrink to the working resolution by area averaging (this is also the denoising that lets
   JPEG-damaged images through);
2. a channel whose 99.9th percentile is below `min_signal` of full range is dark: its map is 0,
   so an empty field gives no cells instead of amplified noise;
3. robust normalisation: subtract the 1st percentile, divide by the 99.5th, clip to [0, 1];
   dim 8-bit and 16-bit images end up on the same scale;
4. Gaussian smoothing (sigma in reference px, see `labelling`), then Otsu's threshold `t` on
   the smoothed values (computed on a square root so that a few very bright nuclei do not push
   it above the dim ones), and the map `x^k / (x^k + t^k)`: 0.5 at the threshold, steep for
   nuclei (k = 4), gentle for cells (k = 2) so that the dimmer cytoplasm where two cells touch
   stays a valley for the watershed instead of being flattened to 1.

Red and yellow must show the same cells. When the IoU of their thresholded masks is below
`min_channel_agreement` (real images give ~0.9+, the synthetic ones 0.98), one of them is from
another field of view, as with `57_F11_1_yellow` in the test data (0.28: the website's yellow
JPEG shows different cells): only the one that covers more of the nuclei is used, with a
warning.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from common.segmentation import labelling


@dataclass(frozen=True)
class ClassicalParams:
    """Options of the classical backend (lengths in reference px, see `labelling`)."""

    nucleus_sigma: float = 4.0  # smoothing of the blue channel
    cell_sigma: float = 10.0  # smoothing of the cytoplasm channels
    nucleus_threshold_scale: float = 1.0  # x Otsu's threshold on blue
    cell_threshold_scale: float = 0.5  # x Otsu's threshold on the cytoplasm: edges are dim
    nucleus_steepness: float = 4.0  # k of x^k / (x^k + t^k)
    cell_steepness: float = 2.0
    min_signal: float = 0.02  # fraction of full range; a channel below it is dark
    min_channel_agreement: float = 0.5  # IoU of the red and yellow cell masks, see module doc

    def replace(self, **changes) -> "ClassicalParams":
        return dataclasses.replace(self, **changes)


def to_unit(channel: np.ndarray) -> np.ndarray:
    """`HxW` uint8/uint16/float channel -> float32 in [0, 1] by its dtype's full range."""
    channel = np.asarray(channel)
    if channel.dtype == np.uint8:
        return channel.astype(np.float32) / 255.0
    if channel.dtype == np.uint16:
        return channel.astype(np.float32) / 65535.0
    if channel.dtype == np.bool_:
        return channel.astype(np.float32)
    if np.issubdtype(channel.dtype, np.floating):
        if channel.size and (not np.isfinite(channel).all() or channel.min() < 0 or channel.max() > 1):
            raise ValueError("a float image must be finite and in [0, 1]")
        return channel.astype(np.float32)
    raise ValueError(f"unsupported pixel type {channel.dtype} (expected uint8, uint16 or float in [0, 1])")


def normalise(x: np.ndarray, min_signal: float) -> np.ndarray:
    """Robust [0, 1] normalisation of a unit-range map; all zeros when the channel is dark."""
    lo, top, hi = np.percentile(x, [1.0, 99.9, 99.5])
    if top < min_signal:
        return np.zeros_like(x)
    hi = max(hi, lo + min_signal / 2)  # a sparse channel: do not divide by ~0
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def otsu(x: np.ndarray) -> float:
    """Otsu's threshold of a [0, 1] map, computed on sqrt(x) (see module docstring)."""
    r = np.sqrt(x)
    hist, edges = np.histogram(r, bins=256, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    t = centres[int(np.argmax(between[:-1]))]
    return float(t * t)


def _soft(x: np.ndarray, t: float, k: float) -> np.ndarray:
    t = max(t, 1e-3)
    xk = np.power(x, k, dtype=np.float32)
    return xk / (xk + np.float32(t ** k))


def _mask(x: np.ndarray, scale: float = 0.5) -> np.ndarray:
    """Foreground of a smoothed map: above `scale` x Otsu's threshold."""
    return x > otsu(x) * scale


def _smooth(x: np.ndarray, sigma_ref: float, ref: float) -> np.ndarray:
    sigma = sigma_ref * ref
    if sigma < 0.3:
        return x
    return cv2.GaussianBlur(x, (0, 0), sigma)


def probability_maps(image: np.ndarray, nuclei_only: bool = False, work_size: int | None = labelling.WORK_SIZE,
                     params: ClassicalParams | None = None):
    """`HxWx4` (R, G, B, Y; uint8, uint16 or float) -> (nucleus map, cell map or None).

    Maps are float32 in [0, 1] at the working resolution (long side `work_size`). With
    `nuclei_only`, only the blue channel is read and the cell map is None; `image` may then
    also be the `HxW` blue channel itself.
    """
    p = params or ClassicalParams()
    image = np.asarray(image)
    if image.ndim == 2:
        if not nuclei_only:
            raise ValueError("a 2-D image is only accepted with nuclei_only=True (it is the blue channel)")
        image = image[..., None]
        blue_index = 0
    elif image.ndim == 3 and image.shape[-1] == 4:
        blue_index = 2
    else:
        raise ValueError(f"expected an HxWx4 image (R, G, B, Y), got shape {image.shape}")
    shape = image.shape[:2]
    work = labelling.working_shape(shape, work_size)
    ref = max(work) / labelling.REFERENCE_SIDE

    def channel(i):
        return normalise(labelling.resize_map(to_unit(image[..., i]), work), p.min_signal)

    blue = _smooth(channel(blue_index), p.nucleus_sigma, ref)
    nuc = np.zeros(work, np.float32) if not blue.any() else _soft(
        blue, otsu(blue) * p.nucleus_threshold_scale, p.nucleus_steepness)
    if nuclei_only:
        return nuc, None
    red, yellow = channel(0), channel(3)
    red_s, yellow_s = _smooth(red, p.cell_sigma, ref), _smooth(yellow, p.cell_sigma, ref)
    if red_s.any() and yellow_s.any():
        red_m, yellow_m = _mask(red_s, p.cell_threshold_scale), _mask(yellow_s, p.cell_threshold_scale)
        iou = (red_m & yellow_m).sum() / max((red_m | yellow_m).sum(), 1)
        if iou < p.min_channel_agreement:
            nuclei = nuc > 0.5
            keep_red = (red_m & nuclei).sum() >= (yellow_m & nuclei).sum()
            warnings.warn(
                f"red and yellow channels show different cells (IoU {iou:.2f} of their masks, "
                f"below {p.min_channel_agreement}): using only {'red' if keep_red else 'yellow'}",
                stacklevel=2)
            (yellow_s if keep_red else red_s)[:] = 0
    cyto = np.maximum(np.maximum(red_s, yellow_s), blue)
    cell = np.zeros(work, np.float32) if not cyto.any() else _soft(
        cyto, otsu(cyto) * p.cell_threshold_scale, p.cell_steepness)
    return nuc, cell
