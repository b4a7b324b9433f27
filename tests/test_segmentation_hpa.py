"""The HPA U-Net backend's own code (scaling, channel order, padding, normalisation, cropping
back, batching) driven by a stand-in network: a numpy function that reads the normalised
input the way a U-Net would see it and returns 3-class probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from common import segmentation as seg
from common.segmentation import hpa
from testkit import segmentation_compare as compare


def _unnormalise(batch: np.ndarray) -> np.ndarray:
    """Stand-in's view: undo hpacellseg's normalisation -> [0, 1] intensities, (N, 3, H, W)."""
    return batch * hpa.STD + hpa.MEAN[None, :, None, None]


class StandIn:
    """Interior = channel `c` above 0.5 (soft); boundary 0; records every batch it sees."""

    def __init__(self, channel: int):
        self.channel = channel
        self.batches: list[np.ndarray] = []

    def __call__(self, batch):
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 3
        self.batches.append(batch.copy())
        x = _unnormalise(batch)[:, self.channel]
        interior = 1.0 / (1.0 + np.exp(-(x - 0.5) * 30.0))
        out = np.zeros(batch.shape, np.float32)
        out[:, hpa.INTERIOR] = interior
        out[:, hpa.BACKGROUND] = 1.0 - interior
        return out


def _scene(height: int, width: int):
    """R, G, B, Y image: nuclei (blue) inside cells drawn in red; yellow is drawn 1.4x wider
    than red, so a net fed yellow in red's place finds cells of the wrong size."""
    yy, xx = np.mgrid[:height, :width]
    image = np.zeros((height, width, 4), np.uint8)
    truth = np.zeros((height, width), np.int32)
    centres = [(0.3, 0.25), (0.35, 0.7), (0.75, 0.45)]
    r_cell, r_nuc = 0.14 * min(height, width), 0.06 * min(height, width)
    for k, (fy, fx) in enumerate(centres, start=1):
        d2 = (yy - fy * height) ** 2 + (xx - fx * width) ** 2
        image[..., 0][d2 <= r_cell ** 2] = 220
        truth[d2 <= r_cell ** 2] = k
        image[..., 2][d2 <= r_nuc ** 2] = 230
        image[..., 3][d2 <= (1.4 * r_cell) ** 2] = 200
    image[..., 1] = 90  # green must never reach the networks
    return image, truth


def test_network_inputs_channel_order_scaling_and_padding():
    image = np.zeros((1000, 700, 4), np.uint8)
    image[..., 0], image[..., 1], image[..., 2], image[..., 3] = 200, 255, 50, 100
    nuc_in, cell_in, size = hpa.network_inputs(image)
    assert size == (250, 175)  # scale factor 0.25
    # Padded: 32 px margin each side, then up to a multiple of 32.
    assert nuc_in.shape == cell_in.shape == (3, 320, 256)
    assert all(n % 32 == 0 for n in nuc_in.shape[1:])
    cell = cell_in * hpa.STD + hpa.MEAN[:, None, None]
    nuc = nuc_in * hpa.STD + hpa.MEAN[:, None, None]
    # Cell net: (red, yellow, blue); nucleus net: blue three times. Never green.
    np.testing.assert_allclose(cell[:, 100, 100], [200 / 255, 100 / 255, 50 / 255], atol=1e-5)
    np.testing.assert_allclose(nuc[:, 100, 100], [50 / 255] * 3, atol=1e-5)
    # Reflect padding repeats the content, it does not add zeros.
    np.testing.assert_allclose(cell[:, 0, 0], [200 / 255, 100 / 255, 50 / 255], atol=1e-5)
    # 16-bit input lands on the same [0, 1] scale.
    nuc16, _, _ = hpa.network_inputs(image.astype(np.uint16) * 257)
    np.testing.assert_allclose(nuc16, nuc_in, atol=1e-4)


@pytest.mark.parametrize("height,width", [(1000, 700), (432, 432), (691, 1229)])
def test_segment_with_stand_in_networks_scales_back_to_full_resolution(height, width):
    image, truth = _scene(height, width)
    nuc_net, cell_net = StandIn(channel=0), StandIn(channel=0)
    s = seg.segment(image, backend="hpa", nuclei_net=nuc_net, cell_net=cell_net)
    assert s.cells.shape == (height, width)
    for net in (nuc_net, cell_net):
        assert len(net.batches) == 1
        assert all(n % 32 == 0 for n in net.batches[0].shape[2:])
    # The cells are where red is: cropped back and rescaled without shift, and not the
    # wider yellow discs, which they would be with the channels swapped.
    m = compare.match(truth, s.cells)
    assert m["true"] == 3 and m["pred"] == 3 and m["matched"] == 3 and m["mean_iou"] > 0.9, m
    assert all(c.has_nucleus for c in s.cell_info())


def test_swapped_channels_would_be_caught():
    """The same check fails when the stand-in reads yellow (channel 1) as the cell marker."""
    image, truth = _scene(480, 640)
    s = seg.segment(image, backend="hpa", nuclei_net=StandIn(0), cell_net=StandIn(1))
    m = compare.match(truth, s.cells)
    assert m["matched"] < 3, m


def test_batches_group_equal_sizes_and_keep_order():
    scenes = [_scene(400, 400), _scene(400, 400), _scene(300, 500), _scene(400, 400)]
    nuc_net, cell_net = StandIn(0), StandIn(0)
    results = seg.segment_batch([im for im, _ in scenes], backend="hpa", batch_size=2,
                                nuclei_net=nuc_net, cell_net=cell_net)
    # Three 400x400 images in batches of 2 -> 2 calls, one 300x500 -> 1 call.
    assert sorted(b.shape[0] for b in nuc_net.batches) == [1, 1, 2]
    for (image, truth), s in zip(scenes, results):
        assert s.cells.shape == truth.shape
        assert compare.match(truth, s.cells)["matched"] == 3


def test_nuclei_only_needs_only_the_nucleus_network():
    image, truth = _scene(512, 512)
    nuc_net = StandIn(0)
    s = seg.segment(image[..., 2], backend="hpa", nuclei_only=True, nuclei_net=nuc_net)
    assert s.num_cells == 3 and np.array_equal(s.cells, s.nuclei)
    with pytest.raises(ValueError, match="cell network"):
        seg.segment(image, backend="hpa", nuclei_net=nuc_net)
    with pytest.raises(ValueError, match="networks"):
        seg.segment(image, backend="hpa")


def test_network_with_wrong_output_shape_is_a_clear_error():
    image, _ = _scene(256, 256)
    with pytest.raises(ValueError, match="returned shape"):
        seg.segment(image, backend="hpa", nuclei_net=lambda b: b[:, :2], cell_net=StandIn(0))


def test_loading_model_files_is_opt_in(tmp_path):
    path = tmp_path / "dpn_unet_nuclei_v1.pth"
    path.write_bytes(b"not really a model")
    with pytest.raises(PermissionError, match="trust"):
        hpa.load_networks(str(path), None)


def test_backend_options_load_the_networks_once_per_process(monkeypatch):
    """The one HPA loader of the builder, predict and `segment`: model files checked, the
    networks loaded once for the same files however many callers ask, nuclei-only without
    the cell model."""
    calls = []

    def fake_load(nuclei_model, cell_model=None, trust_model_files=False, device=None):
        calls.append((nuclei_model, cell_model, trust_model_files, device))
        return hpa.Networks(nuclei=StandIn(0), cell=None if cell_model is None else StandIn(0))

    monkeypatch.setattr(hpa, "load_networks", fake_load)
    hpa.shared_networks.cache_clear()
    try:
        assert seg.backend_options("default", "n.pth", "c.pth") == {}
        with pytest.raises(ValueError, match="--nuclei-model and --cell-model"):
            seg.backend_options("hpa", "n.pth", None, True)
        with pytest.raises(ValueError, match="needs --nuclei-model \\("):
            seg.backend_options("hpa", None, None, True, nuclei_only=True)
        first = seg.backend_options("hpa", "n.pth", "c.pth", True)["networks"]
        again = seg.backend_options("hpa", "n.pth", "c.pth", True)["networks"]
        assert first is again and calls == [("n.pth", "c.pth", True, None)]
        nuclei_only = seg.backend_options("hpa", "n.pth", "c.pth", True, device="cpu", nuclei_only=True)
        assert nuclei_only["networks"].cell is None and calls[-1] == ("n.pth", None, True, "cpu")
    finally:
        hpa.shared_networks.cache_clear()
