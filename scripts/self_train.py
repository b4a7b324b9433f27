"""Self-training rounds: image labels -> cell labels from the model's own scores -> a new run.

    bash scripts/self_train.sh --images DIR --labels CSV --base RUN --out DIR [--rounds N]

One round r (folder OUT/round{r}; the previous run is the base for round 1, else
OUT/round{r-1}/run; its training shards are the base's for round 1, else the previous round's):

1. **Fold models** (out of fold, the default): for each fold f of the previous shards, a run that
   never trained on fold f: the previous run itself when it validated on f, else a run trained
   like the base from scratch with `val_fold = f` (OUT/round{r}/fold{f}). `--in-sample` skips
   them and scores every image with the previous run (cheaper; see docs/self_training.md for what it costs
   in quality).
2. **Scores:** `python -m infer_gpu predict --labels` on each fold's images with its fold model,
   writing the per-cell table (`--cells`); the fold tables are joined into OUT/round{r}/cells.parquet.
3. **Pseudo-labels:** `python -m infer_gpu pseudo-label` -> OUT/round{r}/cell_labels.csv (the
   rule's options after `--` go to it, e.g. `-- --tau 0.5`).
4. **Shards:** `python -m tfrecords_builder` with the previous shards' settings (mode, tile spec,
   segmentation, folds, seed, grouping) and `--cell-labels` -> OUT/round{r}/shards.
5. **Training:** the base run's config on the new shards, starting from the previous run's
   weights (`--from-scratch` trains anew) -> OUT/round{r}/run.

OUT/run then points at the last round's run (a symlink), usable by predict as any run. Every
intermediate stays in OUT; each step is skipped when its output is complete, and predict, the
builder and the trainer resume their own work, so the same command after a kill finishes what
is missing. The base run's shards must have been cut by a segmenter predict can run again
(`default` or `hpa`), not from precomputed `--masks`: predict's cells must be the build's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import labels as labellib, shard_folder, storage  # noqa: E402
from common import run_folder  # noqa: E402


class RoundError(RuntimeError):
    """A round that cannot start (a base it cannot reproduce, missing inputs)."""


def log(msg: str) -> None:
    print(f"self-train: {msg}", flush=True)


def run_cli(args: list[str], what: str, ok=(0,)) -> int:
    """One stage's command line, as a user runs it; its output goes to our console."""
    cmd = [sys.executable, "-m", *args]
    log(f"{what}: {' '.join(args[:2])} ...")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = subprocess.call(cmd, env=env)
    if code not in ok:
        raise RoundError(f"{what} failed with exit status {code}: {' '.join(cmd)}")
    return code


def base_settings(base: str) -> tuple[dict, str, dict]:
    """(the base run's config.json, its shard folder, that folder's manifest)."""
    if not run_folder.has_config(base):
        raise RoundError(f"--base {base}: not a run folder (no config.json)")
    config = run_folder.read_config(base)
    shards = config.get("data", "")
    manifest = shard_folder.read_manifest(shards) if shards else None
    if manifest is None:
        raise RoundError(f"--base {base}: its training shards {shards!r} have no manifest.json")
    build = manifest["config"]
    if build.get("mode") == "image":
        raise RoundError(f"--base {base}: an image-mode run; self-training needs cell or bag runs")
    if build.get("masks"):
        raise RoundError(f"--base {base}: its shards were cut from precomputed label maps "
                         f"(--masks {build['masks']}), which predict cannot cut again; build the base's "
                         "shards with --segmenter default (or hpa) to self-train it")
    return config, shards, manifest


def builder_args(build: dict) -> list[str]:
    """The builder options that reproduce a build's content (less inputs and outputs)."""
    args = ["--mode", build["mode"], "--size", str(build["size"]), "--folds", str(build["folds"]),
            "--seed", str(build["seed"]), "--margin", str(build["margin"]),
            "--interpolation", build["interpolation"], "--max-cells", str(build["max_cells"]),
            "--segmenter", build["segmenter"], "--shard-mb", str(build["shard_mb"])]
    if build.get("group_by"):
        args += ["--group-by", build["group_by"]]
    if not build.get("mask_outside", True):
        args.append("--keep-outside")
    if build.get("segmenter") == "hpa":
        args += ["--nuclei-model", build["nuclei_model"], "--cell-model", build["cell_model"],
                 "--trust-model-files"]
    return args


def fold_ids(manifest: dict, labels: str) -> dict[int, list[tuple[str, str]]]:
    """`{fold: [(ID, Label), ...]}` of the label list's rows that the shards hold, list order."""
    from common.labels import read_label_rows

    folds: dict[int, list] = {}
    images = manifest["images"]
    for row in read_label_rows(labels):
        entry = images.get(row.get("ID", ""))
        if entry is not None:
            folds.setdefault(int(entry["fold"]), []).append((row["ID"], row["Label"]))
    return folds


def write_labels(path: str, rows) -> None:
    storage.write_text(path, labellib.format_label_rows(["ID", "Label"], rows))


def train_like(config: dict, **changes) -> None:
    """Train a run with the base's config and `changes` (data, out, weights, val_fold), resuming
    what a killed call left; in this process (the trainer's library call)."""
    from common import config as cfglib

    out = changes["out"]
    if storage.exists(run_folder.model_path(out)) and run_folder.has_config(out):
        log(f"{out}: already trained")
        return
    os.environ.setdefault("KERAS_BACKEND", config.get("backend") or "tensorflow")
    from train_tpu.config import TrainConfig
    from train_tpu.train import train

    import dataclasses

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    # the base resolved its own targets (image labels): each new run finds its data's again
    fresh = {"targets": "auto", "targets_fingerprint": ""}
    cfg = cfglib.from_dict(TrainConfig, {k: v for k, v in {**config, **fresh, **changes}.items() if k in known})
    log(f"training {out} ({cfg.mode}, val fold {cfg.val_fold}, weights {cfg.weights})")
    summary = train(cfg, resume=True)
    last = summary.get("last") or {}
    log(f"{out}: val_macro_auc {last.get('val_macro_auc', float('nan')):.4f}")


def fold_weights(config: dict) -> str:
    """A fold model starts as the base did, unless the base started from another run (which
    may have trained on the fold): then from scratch."""
    w = config.get("weights", "none")
    return "none" if w not in ("none", "imagenet") and run_folder.has_config(w) else w


def one_round(r: int, a, base_cfg: dict, prev_run: str, prev_shards: str, prev_manifest: dict) -> tuple[str, str]:
    """Round r; returns (its run, its shards)."""
    rd = os.path.join(a.out, f"round{r}")
    os.makedirs(rd, exist_ok=True)
    build = prev_manifest["config"]
    prev_val = int(run_folder.read_config(prev_run).get("val_fold", 0))
    cells = os.path.join(rd, "cells.parquet")
    predict_common = ["--images", a.images, "--no-progress", "--resume"]
    seconds = {"fold_models": 0.0, "scores": 0.0, "pseudo_label": 0.0, "shards": 0.0, "train": 0.0}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] += now - clock
        clock = now

    # 1-2. scores, out of fold (or in sample)
    if not storage.exists(cells):
        from common import cell_table

        tables = []
        if a.in_sample:
            sub = os.path.join(rd, "scores.csv")
            run_cli(["infer_gpu", "predict", "--labels", a.labels, "--model", prev_run, "--out", sub,
                     "--cells", os.path.join(rd, "cells_all.parquet"), *predict_common],
                    "scoring every image with the previous run (in sample)", ok=(0, 3))
            tables.append(cell_table.read(os.path.join(rd, "cells_all.parquet")))
        else:
            folds = fold_ids(prev_manifest, a.labels)
            for f in sorted(folds):
                fold_run = prev_run if f == prev_val else os.path.join(rd, f"fold{f}")
                lap("scores")
                if fold_run != prev_run:
                    train_like(base_cfg, data=prev_shards, out=fold_run, val_fold=f,
                               weights=fold_weights(base_cfg))
                lap("fold_models")
                ids = os.path.join(rd, f"fold{f}.csv")
                write_labels(ids, folds[f])
                part = os.path.join(rd, f"cells_fold{f}.parquet")
                run_cli(["infer_gpu", "predict", "--labels", ids, "--model", fold_run,
                         "--out", os.path.join(rd, f"scores_fold{f}.csv"), "--cells", part, *predict_common],
                        f"scoring fold {f} ({len(folds[f])} images) with a run that never trained on it",
                        ok=(0, 3))
                tables.append(cell_table.read(part))
        joined = cell_table.CellTable.concat(tables, meta=tables[0].meta if tables else {})
        cell_table.write(cells, joined, joined.meta)
        log(f"{cells}: {len(joined)} cells")

    lap("scores")

    # 3. pseudo-labels
    labels_out = os.path.join(rd, "cell_labels.csv")
    if not storage.exists(labels_out):
        run_cli(["infer_gpu", "pseudo-label", "--cells", cells, "--labels", a.labels, "--out", labels_out,
                 *a.rule], "pseudo-labels")

    lap("pseudo_label")

    # 4. shards with the cell labels
    shards = os.path.join(rd, "shards")
    run_cli(["tfrecords_builder", "--images", a.images, "--labels", a.labels, "--out", shards,
             *builder_args(build), "--cell-labels", labels_out, "--workers", str(a.workers),
             "--no-progress"], "shards with cell labels", ok=(0, 2))

    lap("shards")

    # 5. the new run
    run = os.path.join(rd, "run")
    weights = "none" if a.from_scratch else prev_run
    train_like(base_cfg, data=shards, out=run, weights=weights,
               **({"epochs": a.epochs} if a.epochs else {}))
    lap("train")
    # this call's seconds per step (0 for a step an earlier, killed call finished)
    storage.write_text(os.path.join(rd, "round.json"), json.dumps(
        {"round": r, "seconds": {k: round(v, 2) for k, v in seconds.items()}}, indent=1) + "\n")
    return run, shards


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bash scripts/self_train.sh",
        description="Self-training rounds on a trained cell or bag run: score the training images "
        "out of fold, turn image labels into soft cell labels (infer_gpu pseudo-label), build shards "
        "with them, train. Leaves OUT/run (the last round's run) and every intermediate in OUT; "
        "the same command after a kill finishes what is missing.",
        epilog="Options after -- go to python -m infer_gpu pseudo-label (the rule), e.g. -- --tau 0.5.")
    p.add_argument("--images", required=True, help="the training images (folder or gs:// prefix)")
    p.add_argument("--labels", required=True, help="their label list (ID,Label), as given to the builder")
    p.add_argument("--base", required=True, help="the trained run to start from (cell or bag mode)")
    p.add_argument("--out", required=True, help="the rounds' folder (local)")
    p.add_argument("--rounds", type=int, default=1, help="rounds, each starting from the last (default 1)")
    p.add_argument("--in-sample", action="store_true",
                   help="score every image with the previous run instead of fold models (cheaper; "
                   "it has seen most of the images)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train each round's run from scratch instead of from the previous run")
    p.add_argument("--epochs", type=int, default=0, help="epochs of each round's run (0 = the base's)")
    p.add_argument("--workers", type=int, default=2, help="builder worker processes (default 2)")
    argv = list(argv)
    rule = []
    if "--" in argv:
        i = argv.index("--")
        argv, rule = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    a.rule = rule
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    try:
        base_cfg, shards, manifest = base_settings(a.base)
        os.makedirs(a.out, exist_ok=True)
        run = a.base
        timings = []
        for r in range(1, a.rounds + 1):
            t0 = time.perf_counter()
            run, shards = one_round(r, a, base_cfg, run, shards, manifest)
            manifest = shard_folder.read_manifest(shards)
            timings.append(round(time.perf_counter() - t0, 1))
        link = os.path.join(a.out, "run")
        target = os.path.relpath(run, a.out)
        if os.path.islink(link) and os.readlink(link) != target:
            os.unlink(link)  # fewer rounds before: point at the newest
        elif os.path.exists(link) and not os.path.islink(link):
            raise RoundError(f"{link} exists and is not the link to the last round's run")
        if not os.path.lexists(link):
            os.symlink(target, link)
        storage.write_text(os.path.join(a.out, "self_train.json"), json.dumps(
            {"base": a.base, "rounds": a.rounds, "in_sample": a.in_sample, "from_scratch": a.from_scratch,
             "rule": a.rule, "run": run, "round_seconds": timings}, indent=1) + "\n")
    except (RoundError, ValueError, FileNotFoundError) as err:
        print(f"self-train: error: {err}", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.0f} s: {os.path.join(a.out, 'run')} -> {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
