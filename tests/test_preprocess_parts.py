"""`common.preprocess.Preprocess`: the tile cut, the bag size and the segmentation, saved flat."""
import json

import pytest

from common import preprocess as P
from common.segmentation import SegmentationSpec

OLD_TILE = """{
  "interpolation": "area",
  "margin": 0.1,
  "mask_outside": true,
  "mode": "cell",
  "model_size": 0,
  "size": 128
}
"""


def test_old_flat_json_without_bag_or_segmentation_loads():
    pre = P.Preprocess.from_json(OLD_TILE)
    assert pre.tile == P.TileSpec(size=128, margin=0.1)
    assert pre.bag == 0 and pre.segmentation is None
    assert pre.mode == pre.role == "cell" and pre.input_size == 128 and pre.size == 128


def test_old_flat_json_with_bag_and_segmentation_loads():
    data = json.loads(OLD_TILE)
    data.update(bag=6, model_size=64, segmentation={"backend": "hpa", "work_size": 512,
                                                    "model_files": ["a", "b"], "options": [["x", "1"]]})
    pre = P.Preprocess.from_json(json.dumps(data))
    assert pre.bag == 6 and pre.role == "bag" and pre.mode == "cell" and pre.input_size == 64
    assert pre.segmentation == SegmentationSpec(backend="hpa", work_size=512, model_files=("a", "b"),
                                                options=(("x", "1"),))
    assert pre.tile == P.TileSpec(size=128, margin=0.1, model_size=64)


@pytest.mark.parametrize("bag,seg", [(0, None), (5, None), (0, SegmentationSpec()),
                                     (3, SegmentationSpec(backend="hpa", model_files=("f1", "f2")))])
def test_save_is_byte_identical_to_what_tilespec_saved(tmp_path, bag, seg):
    # what TileSpec.save wrote when TileSpec still held bag and segmentation (its to_json:
    # `json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n"`)
    old = {"size": 96, "mode": "cell", "mask_outside": True, "margin": 0.2, "interpolation": "area",
           "model_size": 64, "bag": bag, "segmentation": None if seg is None else seg.to_dict()}
    (tmp_path / "old.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    pre = P.Preprocess(P.TileSpec(size=96, margin=0.2, model_size=64), bag=bag, segmentation=seg)
    pre.save(str(tmp_path / "new.json"))
    assert (tmp_path / "new.json").read_bytes() == (tmp_path / "old.json").read_bytes()
    assert P.Preprocess.load(str(tmp_path / "old.json")) == pre
    assert P.Preprocess.load(str(tmp_path / "new.json")).to_json() == pre.to_json()


def test_image_mode_round_trip(tmp_path):
    pre = P.Preprocess(P.TileSpec(size=256, mode="image"))
    pre.save(str(tmp_path / "p.json"))
    assert P.Preprocess.load(str(tmp_path / "p.json")) == pre
    assert pre.mode == pre.role == "image"


def test_cross_part_errors():
    with pytest.raises(ValueError, match="bag 4 needs tile.mode 'cell'"):
        P.Preprocess(P.TileSpec(mode="image"), bag=4)
    with pytest.raises(ValueError, match="bag 4 needs tile.mode 'cell'"):
        P.Preprocess.from_json(json.dumps({**json.loads(OLD_TILE), "mode": "image", "bag": 4}))
    with pytest.raises(ValueError, match="bag must be an int >= 0"):
        P.Preprocess(P.TileSpec(), bag=-1)
    with pytest.raises(TypeError, match="tile must be a TileSpec"):
        P.Preprocess({"size": 64})
    with pytest.raises(ValueError, match="unknown keys \\['sise'\\]"):
        P.Preprocess.from_json(json.dumps({**json.loads(OLD_TILE), "sise": 3}))
    with pytest.raises(ValueError, match="TileSpec.size must be >= 8"):
        P.Preprocess.from_json(json.dumps({**json.loads(OLD_TILE), "size": 4}))


def test_bag_and_tile_runs_share_the_tile_when_cut_alike():
    seg = SegmentationSpec()
    tile_run = P.Preprocess(P.TileSpec(size=128, model_size=64), segmentation=seg)
    bag_run = P.Preprocess(P.TileSpec(size=128, model_size=64), bag=8, segmentation=seg)
    assert tile_run != bag_run
    assert tile_run.tile == bag_run.tile and hash(tile_run.tile) == hash(bag_run.tile)
    other = P.Preprocess(P.TileSpec(size=128, model_size=64, margin=0.1), bag=8)
    assert other.tile != bag_run.tile


def test_tilespec_holds_the_cut_only():
    assert [f for f in P.TileSpec.__dataclass_fields__] == list(P.CUT_FIELDS)
    with pytest.raises(ValueError, match="unknown keys \\['bag'\\]"):
        P.TileSpec.from_json('{"size": 64, "bag": 3}')


def test_predict_cuts_once_for_a_bag_run_and_a_tile_run_cut_alike(monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    from infer_gpu import reading

    calls = []
    real = P.cell_tiles
    monkeypatch.setattr(P, "cell_tiles", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 4), dtype=np.uint8)
    cells = np.zeros((40, 40), np.int32)
    cells[2:12, 3:15], cells[20:35, 18:30] = 1, 2
    info = [SimpleNamespace(id=1, bbox=(2, 3, 12, 15)), SimpleNamespace(id=2, bbox=(20, 18, 35, 30))]
    tile = P.TileSpec(size=16)
    out = reading.cut_tiles(image, cells, info, [P.Preprocess(tile), P.Preprocess(tile, bag=4),
                                                 P.Preprocess(P.TileSpec(size=16, margin=0.1))])
    assert calls == [tile, P.TileSpec(size=16, margin=0.1)]  # the bag run reuses the tile run's tiles
    chunks, mask = out[1]
    assert chunks.shape == (1, 4, 16, 16, 4) and mask.tolist() == [[1, 1, 0, 0]]
    np.testing.assert_array_equal(chunks[0, :2], out[0])
