"""`python -m train_tpu`'s options: derived from TrainConfig, applied over the preset."""
import dataclasses

import pytest

from train_tpu import cli
from train_tpu.config import PRESETS, TrainConfig, make_config

PATHS = ["--data", "d", "--mode", "cell", "--out", "o"]


def _cfg(*argv):
    return cli.config_from_args(cli.build_parser().parse_args([*PATHS, *argv]))


def test_every_field_has_a_flag_with_its_comment_as_help():
    text = " ".join(cli.build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--batch-size BATCH_SIZE GLOBAL batch size (split over the replicas) (default: 64)" in text
    assert "--flip, --no-flip random horizontal and vertical flips (default: True)" in text
    for flag in ("--preset NAME", "--resume", "--set KEY=VALUE", "--verbose"):
        assert flag in text


def test_only_the_options_given_change_the_preset():
    # the default preset is "default", as in the builder and predict (it was smoke)
    assert _cfg() == make_config("default", data="d", out="o", mode="cell")
    assert _cfg() == dataclasses.replace(TrainConfig(), data="d", out="o", mode="cell")
    assert _cfg("--preset", "smoke") == make_config("smoke", data="d", out="o", mode="cell")
    cfg = _cfg("--preset", "b4_cell_384", "--learning-rate", "3e-4", "--no-rotate",
               "--backbone", "efficientnetv2_s", "--val-fold", "2")
    assert cfg == dataclasses.replace(PRESETS["b4_cell_384"], data="d", out="o", mode="cell",
                                      learning_rate=3e-4, rotate=False,
                                      backbone="efficientnetv2_s", val_fold=2)
    assert _cfg("--weight-decay", "1e-3", "--set", "weight_decay=2e-3").weight_decay == 2e-3


def test_bad_values_are_errors():
    for argv in (["--backbone", "resnet50"], ["--preset", "b9"], ["--epochs", "many"],
                 ["--mode", "cell"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv if argv[0] == "--mode" else [*PATHS, *argv])
    with pytest.raises(ValueError, match="invalid epochs=0"):
        _cfg("--epochs", "0")


def test_main_exits_2_on_an_invalid_config(capsys):
    assert cli.main([*PATHS, "--scale", "0.7"]) == 2
    assert "invalid scale=0.7" in capsys.readouterr().err
