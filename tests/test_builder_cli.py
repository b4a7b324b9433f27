"""`python -m tfrecords_builder`'s options: derived from BuildConfig, applied over the preset."""
import pytest

from tfrecords_builder import __main__ as cli
from tfrecords_builder.config import PRESETS, BuildConfig, make_config

PATHS = ["--images", "imgs", "--labels", "a.csv", "--out", "o"]


def _cfg(*argv):
    args, rest = cli.build_parser().parse_known_args([*PATHS, *argv])
    assert not rest
    return cli.config_from_args(args)


def test_every_field_has_a_documented_flag():
    text = " ".join(cli.build_parser().format_help().split())
    for name in BuildConfig.__dataclass_fields__:
        flag = "--keep-outside" if name == "mask_outside" else "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "--shard-mb SHARD_MB target shard size in MB" in text and "(default: 100.0)" in text
    assert "--runner DataflowRunner" in text  # the Beam pass-through is explained


def test_options_override_the_preset_and_nothing_else():
    assert _cfg() == make_config(images=("imgs",), labels=("a.csv",), out="o")
    assert _cfg().size == 512 and _cfg("--mode", "cell").size == 224  # the mode's own default
    smoke = _cfg("--preset", "smoke", "--mode", "cell", "--folds", "3")
    assert (smoke.size, smoke.folds, smoke.limit, smoke.shard_mb) == (64, 3, 8, 0.05)
    cfg = _cfg("--labels", "b.csv", "--images", "more", "--keep-outside", "--trust-model-files",
               "--shard-mb", "2.5", "--engine", "beam")
    assert cfg.labels == ("a.csv", "b.csv") and cfg.images == ("imgs", "more")
    assert cfg.mask_outside is False and cfg.trust_model_files is True
    assert cfg.shard_mb == 2.5 and cfg.engine == "beam"
    # the segmentation's working size, named as predict names it (PredictConfig.work_size)
    assert _cfg().work_size == 512 and _cfg("--mode", "cell", "--work-size", "256").work_size == 256
    with pytest.raises(ValueError, match="work_size must be >= 1"):
        _cfg("--work-size", "0")


def test_presets_are_configs_without_inputs():
    assert all(isinstance(p, BuildConfig) for p in PRESETS.values())
    assert PRESETS["default"].size == 0 and PRESETS["default"].tile_spec().size == 512
    with pytest.raises(ValueError, match="output folder"):
        make_config(images="i", labels="l.csv")
    with pytest.raises(ValueError, match="unknown preset 'tiny'; known: default, smoke"):
        make_config("tiny")


def test_errors_and_exit_codes(capsys):
    assert cli.main([*PATHS, "--preset", "tiny"]) == 1
    assert "unknown preset 'tiny'" in capsys.readouterr().err
    assert cli.main([*PATHS, "--folds", "0"]) == 1
    assert "folds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main([*PATHS, "--runner", "DataflowRunner"])  # Beam options without --engine beam
    assert exit_.value.code == 2 and "unrecognized arguments: --runner" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--labels", "a.csv", "--out", "o"])
    assert exit_.value.code == 2


def test_set_and_verbose_as_in_the_other_stages():
    cfg = _cfg("--mode", "cell", "--set", "folds=3", "--set", "labels=a.csv,b.csv",
               "--set", "mask_outside=false")
    assert (cfg.folds, cfg.labels, cfg.mask_outside, cfg.size) == (3, ("a.csv", "b.csv"), False, 224)
    with pytest.raises(ValueError, match=r"unknown keys \['fold'\]"):
        _cfg("--set", "fold=3")
    text = " ".join(cli.build_parser().format_help().split())
    assert "--set KEY=VALUE" in text and "--verbose" in text
