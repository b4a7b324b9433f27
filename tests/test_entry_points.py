"""The three stages' command lines agree: --preset defaults to `default`, `--set KEY=VALUE`
(common.config) reaches any config field, `--verbose` brings TensorFlow's start-up lines back."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from infer_gpu import cli as infer_cli
from infer_gpu.config import PRESETS as PREDICT_PRESETS
from infer_gpu.predict import config_from_args as predict_config
from tfrecords_builder import __main__ as builder_cli
from train_tpu import cli as train_cli
from train_tpu.config import PRESETS as TRAIN_PRESETS

PREDICT = ["predict", "--images", "i", "--sample-submission", "s.csv", "--model", "m", "--out", "o.csv"]
PREDICT_PATHS = dict(images="i", sample_submission="s.csv", models=("m",), out="o.csv")  # as fields, as in the other stages


def _sub(parser, name):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _help(parser):
    return " ".join(parser.format_help().split())


def test_every_stage_defaults_to_the_default_preset():
    builder = builder_cli.build_parser().parse_known_args(["--images", "i", "--labels", "l", "--out", "o"])[0]
    trainer = train_cli.build_parser().parse_args(["--data", "d", "--mode", "cell", "--out", "o"])
    predict = infer_cli.build_parser().parse_args(PREDICT)
    assert builder.preset == trainer.preset == predict.preset == "default"
    assert train_cli.config_from_args(trainer) == dataclasses.replace(
        TRAIN_PRESETS["default"], data="d", out="o", mode="cell")
    assert predict_config(predict) == dataclasses.replace(PREDICT_PRESETS["default"], **PREDICT_PATHS)


def test_every_stage_has_set_and_verbose():
    parsers = [builder_cli.build_parser(), builder_cli.build_download_parser(),
               train_cli.build_parser(), _sub(infer_cli.build_parser(), "predict")]
    for p in parsers:
        text = _help(p)
        assert "--set KEY=VALUE" in text and "--verbose" in text, p.prog
    infer = infer_cli.build_parser()
    for name in infer_cli.COMMANDS:
        assert "--verbose" in _help(_sub(infer, name)), name


def test_predict_set_reaches_the_config_and_the_combine_rule():
    args = infer_cli.build_parser().parse_args(
        [*PREDICT, "--preset", "smoke", "--min-score", "0.3", "--tta", "4", "--set", "tta=2",
         "--set", "rule.cell_weight=0.25", "--set", "work_size=320"])
    cfg = predict_config(args)
    smoke = PREDICT_PRESETS["smoke"]
    assert cfg == dataclasses.replace(
        smoke, tta=2, work_size=320, **PREDICT_PATHS,
        rule=dataclasses.replace(smoke.rule, cell_weight=0.25, min_score=0.3))
    bad = infer_cli.build_parser().parse_args([*PREDICT, "--set", "rule.cell_wieght=1"])
    with pytest.raises(ValueError, match=r"CombineRule: unknown keys \['cell_wieght'\]"):
        predict_config(bad)
    bad = infer_cli.build_parser().parse_args([*PREDICT, "--set", "tta=9"])
    with pytest.raises(ValueError, match="tta=9"):  # PredictConfig validates it
        predict_config(bad)
