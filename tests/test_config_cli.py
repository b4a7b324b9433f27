"""common.config's command-line derivation: one flag per field, help from the field comments."""
import argparse
import dataclasses
from typing import Literal, Optional

import pytest

from common import config as C


@dataclasses.dataclass(frozen=True)
class Opts:
    """A config with one field of each kind the CLI derivation handles."""

    out: str = ""  # output folder
    size: int = 64  # tile side, px; "#" in a string is no comment
    rate: float = 0.5  # learning rate
    # a comment block above a field
    # is part of its help
    names: tuple[str, ...] = ()  # repeatable names
    pair: tuple[int, int] = (1, 2)  # two ints
    verbose: bool = False  # say more
    flip: bool = True  # random flips
    mask: bool = True  # zero the outside
    mode: str = "a"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


PRESETS = {"default": Opts(), "big": Opts(size=512, rate=0.1, verbose=True)}


def _parser(**kw):
    return C.add_arguments(argparse.ArgumentParser(prog="t"), Opts, **kw)


def _help(parser) -> str:
    return " ".join(parser.format_help().split())  # argparse wraps lines


def test_help_comes_from_field_comments_with_preset_defaults():
    helps = C.field_help(Opts)
    assert helps["size"] == 'tile side, px; "#" in a string is no comment'
    assert helps["names"] == "a comment block above a field is part of its help repeatable names"
    assert "mode" not in helps
    text = _help(_parser(defaults=PRESETS["big"], false_flags={"mask": "--keep-outside"}))
    assert "--size SIZE tile side, px" in text and "(default: 512)" in text
    assert "learning rate (default: 0.1)" in text
    assert "--out OUT output folder --size" in text  # an empty default is not shown
    assert "--flip, --no-flip random flips (default: True)" in text
    assert "--keep-outside zero the outside" in text


def test_only_given_options_override_the_preset():
    p = _parser(defaults=PRESETS["default"])
    args = p.parse_args(["--rate", "0.25"])
    assert vars(args) == {"rate": 0.25}  # nothing else present: the preset's values stay
    cfg = C.from_args(Opts, args, base=PRESETS["big"])
    assert cfg == dataclasses.replace(PRESETS["big"], rate=0.25)
    assert cfg.size == 512 and cfg.verbose is True
    assert C.from_args(Opts, p.parse_args([])) == Opts()
    assert C.from_args(Opts, p.parse_args(["--size", "8", "--mode", "b"])) == Opts(size=8, mode="b")


def test_bools():
    p = _parser(false_flags={"mask": "--keep-outside"})
    assert C.from_args(Opts, p.parse_args(["--verbose"])).verbose is True
    assert C.from_args(Opts, p.parse_args(["--no-flip"])).flip is False
    assert C.from_args(Opts, p.parse_args(["--flip"]), base=Opts(flip=False)).flip is True
    assert C.from_args(Opts, p.parse_args(["--keep-outside"])).mask is False
    assert C.from_args(Opts, p.parse_args([])).mask is True
    with pytest.raises(SystemExit):
        p.parse_args(["--no-verbose"])  # store_true where the default is False


def test_tuples_types_and_choices():
    p = _parser(types={"size": C.positive_int}, choices={"mode": ("a", "b")}, metavars={"out": "DIR"})
    cfg = C.from_args(Opts, p.parse_args(["--names", "x", "--names", "y", "--pair", "3", "4"]))
    assert cfg.names == ("x", "y") and cfg.pair == (3, 4)
    for bad in (["--size", "0"], ["--mode", "c"], ["--pair", "1"], ["--rate", "fast"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    assert "--out DIR" in _help(p)


def test_positional_required_skip_and_flags():
    p = _parser(positional=("out",), required=("mode",), skip=("pair",), flags={"names": "--name"})
    args = p.parse_args(["o", "--mode", "b", "--name", "n"])
    assert C.from_args(Opts, args) == Opts(out="o", mode="b", names=("n",))
    with pytest.raises(SystemExit):
        p.parse_args(["o"])  # --mode is required
    with pytest.raises(SystemExit):
        p.parse_args(["o", "--mode", "a", "--pair", "1", "2"])  # skipped
    with pytest.raises(ValueError, match="not fields.*sise"):
        _parser(skip=("sise",))


def test_the_dataclass_validates_and_unknown_preset_is_an_error():
    p = _parser()
    with pytest.raises(ValueError, match="size must be >= 1"):
        C.from_args(Opts, p.parse_args(["--size", "-3"]), base=PRESETS["big"])
    with pytest.raises(ValueError, match="unknown preset 'huge'; known: default, big"):
        C.preset(PRESETS, "huge")
    assert C.preset(PRESETS, "big") is PRESETS["big"]


@dataclasses.dataclass(frozen=True)
class Typed:
    limit: Optional[int] = None  # at most this many
    device: Literal["cpu", "gpu"] = "cpu"  # where to run
    ratio: float | None = None  # a fraction


def test_optional_and_literal_fields():
    p = C.add_arguments(argparse.ArgumentParser(prog="t"), Typed)
    cfg = C.from_args(Typed, p.parse_args(["--limit", "3", "--device", "gpu", "--ratio", "0.5"]))
    assert cfg == Typed(limit=3, device="gpu", ratio=0.5)
    assert C.from_args(Typed, p.parse_args([])) == Typed()
    with pytest.raises(SystemExit):
        p.parse_args(["--device", "tpu"])
    assert "--device {cpu,gpu} where to run (default: cpu)" in _help(p)


@dataclasses.dataclass(frozen=True)
class Outer:
    """A config with a nested one, as PredictConfig holds its CombineRule."""

    inner: Opts = Opts()
    work: Optional[int] = None  # None = decided later
    seed: int = 0


def test_set_reads_each_value_as_its_field_and_nests():
    p = C.add_set_argument(_parser(), "Opts")
    args = p.parse_args(["--size", "9", "--set", "size=12", "--set", "flip=no", "--set",
                         "names=a, b", "--set", "pair=3,4", "--set", "rate=0.125"])
    cfg = C.from_args(Opts, args, base=PRESETS["big"], sets=args.set)
    assert cfg == dataclasses.replace(PRESETS["big"], size=12, flip=False, names=("a", "b"),
                                      pair=(3, 4), rate=0.125)  # --set after the options
    assert C.parse_sets(Outer, ["inner.size=7", "inner.mode=b", "work=none", "seed=4"]) == {
        "inner": {"size": 7, "mode": "b"}, "work": None, "seed": 4}
    out = C.from_args(Outer, argparse.Namespace(), base=Outer(work=3),
                      sets=["inner.size=7", "work=none"])
    assert out == Outer(inner=Opts(size=7), work=None)


def test_set_errors_name_the_item():
    for items, match in ((["size"], "expected KEY=VALUE"), (["sise=3"], r"unknown keys \['sise'\]"),
                         (["size=big"], "'size=big'"), (["flip=maybe"], "not a boolean"),
                         (["size.x=1"], "size has no fields")):
        with pytest.raises(ValueError, match=match):
            C.parse_sets(Opts, items)
    with pytest.raises(ValueError, match="size must be >= 1"):  # the dataclass validates
        C.from_args(Opts, argparse.Namespace(), base=Opts(), sets=["size=0"])


def test_exclusive_groups():
    p = _parser(exclusive=(("out", "mode"),))
    assert C.from_args(Opts, p.parse_args(["--out", "o"])) == Opts(out="o")
    assert C.from_args(Opts, p.parse_args([])) == Opts()  # not required: neither is fine
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "o", "--mode", "b"])  # not both
    required = _parser(exclusive=(("out", "mode"),), required=("out",), metavars={"out": "DIR"})
    assert C.from_args(Opts, required.parse_args(["--mode", "b"])) == Opts(mode="b")  # either one
    with pytest.raises(SystemExit):
        required.parse_args([])  # one of the group is required
    with pytest.raises(ValueError, match="not fields.*nope"):
        _parser(exclusive=(("out", "nope"),))
    with pytest.raises(ValueError, match="two exclusive groups"):
        _parser(exclusive=(("out", "mode"), ("mode", "size")))
