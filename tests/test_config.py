import dataclasses

import pytest

from common import config as C


@dataclasses.dataclass(frozen=True)
class Inner:
    a: int = 1
    names: tuple[str, ...] = ("x",)


@dataclasses.dataclass(frozen=True)
class Outer:
    size: int = 64
    rate: float = 0.5
    flag: bool = False
    inner: Inner = Inner()


def test_json_round_trip_and_override(tmp_path):
    cfg = C.override(Outer(), size=128, flag="true")
    assert cfg.size == 128 and cfg.flag is True
    path = str(tmp_path / "c.json")
    C.save(cfg, path)
    back = C.load(Outer, path)
    assert back == cfg
    assert isinstance(back.inner, Inner) and back.inner.names == ("x",)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="unknown keys.*sise"):
        C.from_dict(Outer, {"sise": 3})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Outer().size = 3
