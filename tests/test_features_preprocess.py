"""The TFRecord schema through real files, and the one preprocessing, eager vs inside tf.data."""
import numpy as np
import pytest
import tensorflow as tf

from common import features as F
from common import shard_folder
from common import preprocess as P


def _random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)


def _label_map(h, w):
    lm = np.zeros((h, w), np.int32)
    lm[10:50, 20:90] = 3
    lm[100:h, 0:30] = 7  # touches the left and bottom borders
    lm[60:80, w - 25:w] = 9
    return lm


def test_tile_png_is_lossless_and_channel_ordered():
    tile = _random_image(33, 33)
    assert np.array_equal(F.decode_tile(F.encode_tile(tile)), tile)
    tf_decoded = tf.io.decode_png(F.encode_tile(tile), channels=4).numpy()
    assert np.array_equal(tf_decoded, tile)  # R, G, B, Y stay in place


def test_schema_round_trip_through_a_tfrecord_file(tmp_path):
    image = _random_image(300, 200)
    lm = _label_map(300, 200)
    spec = P.TileSpec(size=32)
    tiles, ids, boxes = P.cell_tiles(image, lm, spec)
    path = str(tmp_path / shard_folder.shard_name(0, 0, 1))
    assert path.endswith("fold0-00000-of-00001.tfrec")
    with tf.io.TFRecordWriter(path) as writer:
        for tile, cid, box in zip(tiles, ids, boxes):
            writer.write(F.serialize(tile, image_id="img_a", labels=[16, 0], source_size=(300, 200), fold=2,
                                     cell_index=int(cid), bbox=box, touches_border=cid == 7,
                                     has_nucleus=cid != 9, cell_area=int((lm == cid).sum())))
        writer.write(F.serialize(P.image_tile(image, spec), image_id="img_a", labels=[], source_size=(300, 200)))
    got = [F.parse(r, tile_size=32) for r in tf.data.TFRecordDataset(path)]
    assert len(got) == 4
    for k, cid in enumerate(ids):
        ex = got[k]
        assert np.array_equal(ex[F.IMAGE].numpy(), tiles[k])
        assert ex[F.IMAGE].shape == (32, 32, 4)
        assert ex[F.LABELS].numpy().tolist() == [1.0] + [0.0] * 15 + [1.0, 0.0, 0.0]
        assert ex[F.IMAGE_ID].numpy() == b"img_a"
        assert ex[F.CELL_INDEX].numpy() == cid
        assert ex[F.FOLD].numpy() == 2
        assert ex[F.BBOX].numpy().tolist() == boxes[k].tolist()
        assert bool(ex[F.TOUCHES_BORDER].numpy()) == (cid == 7)
        assert bool(ex[F.HAS_NUCLEUS].numpy()) == (cid != 9)
        assert ex[F.CELL_AREA].numpy() == (lm == cid).sum()
        assert (ex[F.SOURCE_HEIGHT].numpy(), ex[F.SOURCE_WIDTH].numpy()) == (300, 200)
    whole = got[3]
    assert whole[F.CELL_INDEX].numpy() == F.WHOLE_IMAGE
    assert whole[F.BBOX].numpy().tolist() == [0, 0, 300, 200]
    assert whole[F.LABELS].numpy().sum() == 0


def test_serialize_rejects_bad_input():
    with pytest.raises(ValueError, match="label 19"):
        F.serialize(np.zeros((8, 8, 4), np.uint8), image_id="x", labels=[19], source_size=(8, 8))
    with pytest.raises(ValueError, match="NxNx4"):
        F.encode_tile(np.zeros((8, 8, 3), np.uint8))


def test_cell_boxes_and_tiles():
    image = _random_image(300, 200, seed=1)
    lm = _label_map(300, 200)
    boxes = P.cell_boxes(lm)
    assert boxes == {3: (10, 20, 50, 90), 7: (100, 0, 300, 30), 9: (60, 175, 80, 200)}
    spec = P.TileSpec(size=64, mask_outside=True)
    tiles, ids, _ = P.cell_tiles(image, lm, spec)
    assert ids.tolist() == [3, 7, 9] and tiles.shape == (3, 64, 64, 4)
    # cell 3 is a 40x70 rectangle: padded to 70x70 with 15 rows of zeros above and below
    exact = P.cell_tile(image, lm == 3, boxes[3], spec.replace(size=70))
    assert np.array_equal(exact[15:55], image[10:50, 20:90])
    assert exact[:15].max() == 0 and exact[55:].max() == 0
    # masking: pixels of other cells inside the box are zeroed
    lm2 = lm.copy()
    lm2[10:20, 20:30] = 5
    masked = P.cell_tile(image, lm2 == 3, boxes[3], spec.replace(size=70))
    assert masked[15:25, 0:10].max() == 0
    unmasked = P.cell_tile(image, lm2 == 3, boxes[3], spec.replace(size=70, mask_outside=False))
    assert np.array_equal(unmasked[15:25, 0:10], image[10:20, 20:30])
    # margin widens the box, clipped to the frame
    assert P.expand_box((10, 20, 50, 90), (300, 200), 0.1) == (3, 13, 57, 97)
    assert P.expand_box((0, 0, 300, 30), (300, 200), 0.5) == (0, 0, 300, 180)


def test_image_tile_non_square():
    image = _random_image(100, 50)
    tile = P.image_tile(image, P.TileSpec(size=100, mode="image"))
    assert tile.shape == (100, 100, 4)
    assert np.array_equal(tile[:, 25:75], image)
    assert tile[:, :25].max() == 0


def test_spec_json_round_trip_and_validation(tmp_path):
    spec = P.TileSpec(size=128, mode="image", mask_outside=False, margin=0.05, interpolation="linear")
    path = str(tmp_path / P.PREPROCESS_FILE)
    spec.save(path)
    assert P.TileSpec.load(path) == spec
    with pytest.raises(ValueError):
        P.TileSpec(mode="tiles")
    with pytest.raises(ValueError):
        P.TileSpec.from_json('{"size": 64, "colour": 1}')


def test_preprocessing_eager_equals_inside_tf_data():
    """big_vision's warning: an op eager and inside tf.data can differ. Ours must not."""
    image = _random_image(300, 200, seed=2)
    lm = _label_map(300, 200)
    spec = P.TileSpec(size=48, margin=0.1)
    eager_tiles, _, boxes = P.cell_tiles(image, lm, spec)
    eager_image = P.image_tile(image, spec)

    def cut(box, cid):
        mask = lm == cid
        return P.cell_tile(image, mask, box, spec)

    ds = tf.data.Dataset.from_tensor_slices((boxes, np.array([3, 7, 9])))
    ds = ds.map(lambda b, c: tf.numpy_function(cut, [b, c], tf.uint8), num_parallel_calls=2, deterministic=True)
    in_graph = np.stack([t.numpy() for t in ds])
    assert np.array_equal(in_graph, eager_tiles)
    img_ds = tf.data.Dataset.from_tensors(image).map(
        lambda x: tf.numpy_function(lambda a: P.image_tile(a, spec), [x], tf.uint8))
    assert np.array_equal(next(iter(img_ds)).numpy(), eager_image)
    model_in = P.to_model_input(tf.constant(eager_tiles))
    assert model_in.dtype == tf.float32 and float(tf.reduce_max(model_in)) <= 255.0
    assert np.array_equal(P.to_model_input(eager_tiles), model_in.numpy())


def _tf_crop_mask_pad(image, label_map, box, cell_id, margin):
    """An independent reference in TensorFlow ops (traced inside tf.data): widen the box by
    `margin` x its longer side (clipped), crop, zero what is not cell `cell_id` (0: keep
    everything), centre-pad with zeros to a square. `HxWx4 uint8` -> `SxSx4 uint8`."""
    shape = tf.shape(image)
    y0, x0, y1, x1 = tf.unstack(tf.cast(box, tf.int32))
    m = tf.cast(tf.round(margin * tf.cast(tf.maximum(y1 - y0, x1 - x0), tf.float64)), tf.int32)
    y0, x0 = tf.maximum(0, y0 - m), tf.maximum(0, x0 - m)
    y1, x1 = tf.minimum(shape[0], y1 + m), tf.minimum(shape[1], x1 + m)
    crop = image[y0:y1, x0:x1]
    if cell_id is not None:
        keep = tf.equal(label_map[y0:y1, x0:x1], tf.cast(cell_id, label_map.dtype))
        crop = tf.where(keep[..., None], crop, tf.zeros_like(crop))
    h, w = y1 - y0, x1 - x0
    side = tf.maximum(h, w)
    return tf.image.pad_to_bounding_box(crop, (side - h) // 2, (side - w) // 2, side, side)


def test_preprocessing_equals_a_tf_op_reference_run_inside_tf_data():
    """The crop, mask and pad of cell_tile and image_tile against the same steps written in
    TensorFlow ops and run as a tf.data graph (not the NumPy code in a numpy_function): a
    difference between the two ways of computing a tile fails here. At each cell's own square
    side the resize is the identity, so the tiles must be equal to the pixel."""
    image = _random_image(300, 200, seed=3)
    lm = _label_map(300, 200)
    boxes = P.cell_boxes(lm)
    ids = sorted(boxes)
    for margin, mask_outside in ((0.0, True), (0.1, True), (0.25, False)):
        ds = tf.data.Dataset.from_tensor_slices(
            (np.array([boxes[i] for i in ids], np.int64), np.array(ids, np.int32)))
        ds = ds.map(lambda b, c: _tf_crop_mask_pad(
            tf.constant(image), tf.constant(lm), b, c if mask_outside else None, margin),
            num_parallel_calls=2, deterministic=True)
        refs = [t.numpy() for t in ds]
        for cid, ref in zip(ids, refs):
            spec = P.TileSpec(size=ref.shape[0], margin=margin, mask_outside=mask_outside)
            got = P.cell_tile(image, lm == cid, boxes[cid], spec)
            assert got.shape == ref.shape and np.array_equal(got, ref), (cid, margin, mask_outside)
            # the batch function cuts the same tile
            assert np.array_equal(P.cell_tiles(image, lm, spec, cell_ids=[cid])[0][0], ref)
        assert len(refs) == 3 and all(r.max() > 0 for r in refs)
    whole = tf.data.Dataset.from_tensors(image).map(
        lambda x: _tf_crop_mask_pad(x, None, tf.constant([0, 0, 300, 200]), None, 0.0))
    ref = next(iter(whole)).numpy()
    assert ref.shape == (300, 300, 4)
    assert np.array_equal(P.image_tile(image, P.TileSpec(size=300, mode="image")), ref)
    # the model-input cast, eager on NumPy against its graph inside tf.data
    tiles = P.cell_tiles(image, lm, P.TileSpec(size=48))[0]
    graph = np.stack([t.numpy() for t in tf.data.Dataset.from_tensor_slices(tiles).map(P.to_model_input)])
    assert graph.dtype == np.float32 and np.array_equal(graph, P.to_model_input(tiles))


def test_model_resize_eager_equals_inside_tf_data():
    tiles = np.stack([_random_image(48, 48, seed=s) for s in range(3)])
    spec = P.TileSpec(size=48, model_size=32)
    assert spec.input_size == 32 and P.TileSpec(size=48).input_size == 48
    eager = P.resize_tiles(tiles, spec.input_size).numpy()
    assert eager.shape == (3, 32, 32, 4) and eager.dtype == np.uint8
    ds = tf.data.Dataset.from_tensor_slices(tiles).map(lambda t: P.resize_tiles(t, spec.input_size))
    graph = np.stack([t.numpy() for t in ds])
    assert np.array_equal(graph, eager)
    assert np.array_equal(P.resize_tiles(tiles, 48).numpy(), tiles)
