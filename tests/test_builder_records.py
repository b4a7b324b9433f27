"""The TF-free Example encoder (common.features.serialize) and the builder's TFRecord framing,
each against TensorFlow's own."""
from __future__ import annotations

import google_crc32c
import numpy as np
import pytest

from common import features
from tfrecords_builder import records
from tfrecords_builder.writer import ShardWriter

CASES = [
    dict(labels=[8, 5, 0], source_size=(2048, 2048), fold=3),
    dict(labels=[], source_size=(1728, 1800), fold=0, cell_index=17, bbox=(0, 5, 300, 1800),
         touches_border=True, has_nucleus=False, cell_area=2**40),
    dict(labels=[18], source_size=(512, 512)),  # defaults: fold -1, cell_index -1 (negative varints)
]


@pytest.mark.parametrize("kwargs", CASES)
def _tf_example(tile, image_id, labels, source_size, fold=-1, cell_index=-1, bbox=None,
                touches_border=False, has_nucleus=True, cell_area=0):
    """The same Example built with TensorFlow's own proto classes."""
    import tensorflow as tf

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

    h, w = source_size
    return tf.train.Example(features=tf.train.Features(feature={
        features.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[features.encode_tile(tile)])),
        features.TILE_SIZE: ints([tile.shape[0]]), features.LABELS: ints(labels),
        features.IMAGE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
        features.CELL_INDEX: ints([cell_index]), features.FOLD: ints([fold]),
        features.SOURCE_HEIGHT: ints([h]), features.SOURCE_WIDTH: ints([w]),
        features.BBOX: ints(bbox or (0, 0, h, w)), features.TOUCHES_BORDER: ints([touches_border]),
        features.HAS_NUCLEUS: ints([has_nucleus]), features.CELL_AREA: ints([cell_area]),
    }))


@pytest.mark.parametrize("kwargs", CASES)
def test_serialize_is_the_example_tensorflow_builds(kwargs):
    import tensorflow as tf

    tile = np.random.default_rng(0).integers(0, 256, (24, 24, 4), dtype=np.uint8)
    ours = features.serialize(tile, image_id="abc-é", **kwargs)
    assert tf.train.Example.FromString(ours) == _tf_example(tile, "abc-é", **kwargs)
    # deterministic bytes (keys sorted), so resumed shards are byte-identical
    assert features.serialize(tile, image_id="abc-é", **kwargs) == ours
    parsed = features.parse(tf.constant(ours), tile_size=24)
    np.testing.assert_array_equal(parsed[features.IMAGE].numpy(), tile)


def test_serialize_rejects_bad_labels_and_shapes():
    tile = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(ValueError, match="label 19 outside"):
        features.serialize(tile, image_id="x", labels=[19], source_size=(8, 8))
    with pytest.raises(ValueError, match="square"):
        features.serialize(np.zeros((8, 9, 4), np.uint8), image_id="x", labels=[1], source_size=(8, 9))


def test_shard_writer_output_reads_back_in_tensorflow_and_python(tmp_path):
    import tensorflow as tf

    payloads = [b"", b"x", bytes(range(256)) * 40]
    writer = ShardWriter(str(tmp_path / "tmp" / "s.tfrec"))
    for p in payloads:
        writer.write(p)
    dest = tmp_path / "out" / "fold0-00000-of-00001.tfrec"
    writer.publish(str(dest))
    assert not (tmp_path / "tmp" / "s.tfrec").exists()
    data = dest.read_bytes()
    assert writer.nbytes == len(data) and writer.examples == 3
    import base64

    assert writer.crc32c == base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(dest))] == payloads
    with open(dest, "rb") as fh:
        assert list(records.read_records(fh)) == payloads


def test_read_records_names_the_damage(tmp_path):
    path = tmp_path / "bad.tfrec"
    blob = bytearray(records.frame(b"hello world"))
    blob[14] ^= 0xFF  # a payload byte
    path.write_bytes(bytes(blob))
    with open(path, "rb") as fh, pytest.raises(ValueError, match="bad.tfrec: bad data CRC"):
        list(records.read_records(fh, name=str(path)))
    path.write_bytes(records.frame(b"hello world")[:-3])
    with open(path, "rb") as fh, pytest.raises(ValueError, match="truncated"):
        list(records.read_records(fh, name=str(path)))
