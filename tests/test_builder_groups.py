"""Folds by group (--group-by): no well or antibody straddles two folds.

The algorithm on random and real label lists (against a frozen copy of the per-image algorithm
that builds before --group-by used), the `auto` rule, label-list columns, and end-to-end local
builds: the manifest's groups, resume refused with another grouping, plans and manifests written
before --group-by still resumed.
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from common import shard_folder
from common.labels import CLASS_NAMES, NUM_CLASSES, read_labels_csv
from common.resume import ResumeError
from tfrecords_builder import build as buildlib
from tfrecords_builder import core
from tfrecords_builder import plan as planlib
from tfrecords_builder.config import make_config
from tfrecords_builder.folds import fold_class_counts, group_of, stratified_folds, stratified_group_folds


def _per_image_reference(label_sets, k, seed=0):
    """`folds.stratified_folds` as it was before groups (commit fe1225e), frozen: the folds of
    every build made before --group-by, which one-image groups must reproduce exactly."""
    n = len(label_sets)
    folds = np.full(n, -1, dtype=np.int64)
    if k == 1 or n == 0:
        folds[:] = 0
        return folds
    rng = np.random.default_rng(seed)
    labels = [sorted({int(v) for v in ls}) for ls in label_sets]
    members = [[] for _ in range(NUM_CLASSES)]
    for i, ls in enumerate(labels):
        for v in ls:
            members[v].append(i)
    remaining = np.array([len(m) for m in members], dtype=np.int64)
    want_total = [n / k] * k
    want = [[remaining[v] / k] * k for v in range(NUM_CLASSES)]

    def _assign(i, label):
        row = want_total if label is None else want[label]
        best = max(row)
        cands = [j for j in range(k) if row[j] == best]
        if len(cands) > 1 and label is not None:
            best_total = max(want_total[j] for j in cands)
            cands = [j for j in cands if want_total[j] == best_total]
        j = cands[0] if len(cands) == 1 else cands[int(rng.integers(len(cands)))]
        folds[i] = j
        want_total[j] -= 1
        for v in labels[i]:
            want[v][j] -= 1
            remaining[v] -= 1

    while remaining.sum() > 0:
        live = np.flatnonzero(remaining > 0)
        fewest = remaining[live].min()
        ties = live[remaining[live] == fewest]
        label = int(ties[0] if len(ties) == 1 else ties[rng.integers(len(ties))])
        items = np.array([i for i in members[label] if folds[i] < 0], dtype=np.int64)
        rng.shuffle(items)
        for i in items:
            _assign(int(i), label)
    unlabelled = np.flatnonzero(folds < 0)
    rng.shuffle(unlabelled)
    for i in unlabelled:
        _assign(int(i), None)
    return folds


def _random_labels(rng, n, empty=0.05):
    """Skewed multilabel sets like HPA's: a few common classes, rare ones, some empty sets."""
    p = np.r_[np.full(17, 0.05), 0.01, 0.14]
    p = p / p.sum()
    out = []
    for _ in range(n):
        if rng.random() < empty:
            out.append([])
        else:
            out.append(sorted(set(rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), p=p).tolist())))
    return out


def _random_groups(rng, n, max_size=6):
    """Group keys for n items in runs of 1..max_size (a well's fields), then shuffled in order."""
    keys, g = [], 0
    while len(keys) < n:
        keys += [f"g{g}"] * int(rng.integers(1, max_size + 1))
        g += 1
    keys = np.array(keys[:n])
    return keys[rng.permutation(n)].tolist()


def _straddling(groups, folds) -> list:
    seen = defaultdict(set)
    for g, f in zip(groups, folds):
        seen[g].add(int(f))
    return [g for g, fs in seen.items() if len(fs) > 1]


# -- the algorithm ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,seed", [(5, 0), (3, 11), (2, 5), (7, 3)])
def test_one_image_groups_give_exactly_the_per_image_folds(k, seed):
    rng = np.random.default_rng(seed + 100)
    labels = _random_labels(rng, 3000)
    ref = _per_image_reference(labels, k, seed)
    ids = [f"id{i}" for i in range(len(labels))]
    assert np.array_equal(stratified_group_folds(labels, ids, k, seed), ref)
    assert np.array_equal(stratified_group_folds(labels, None, k, seed), ref)
    assert np.array_equal(stratified_folds(labels, k, seed), ref)
    # the builder's own per-image keys (image:<id>, and auto on non-HPA IDs) are one-image groups
    uuids = [f"{i:08x}-bb99-11e8-b2b9-ac1f6b6435d0" for i in range(len(labels))]
    assert np.array_equal(stratified_group_folds(labels, [group_of(u) for u in uuids], k, seed), ref)


def test_one_image_groups_on_the_real_train_csv(shared_data):
    rows = read_labels_csv(str(shared_data / "kaggle2021" / "train.csv"))
    sample = [rows[i] for i in np.random.default_rng(0).choice(len(rows), 8000, replace=False)]
    for label_sets, k, seed in (([ls for _, ls in rows], 5, 0), ([ls for _, ls in sample], 4, 9)):
        ref = _per_image_reference(label_sets, k, seed)
        ids = [i for i, _ in (rows if len(label_sets) == len(rows) else sample)]
        got = stratified_group_folds(label_sets, [group_of(i) for i in ids], k, seed)
        assert np.array_equal(got, ref)
    assert all(group_of(i) == f"image:{i}" for i, _ in rows)  # competition UUIDs: per image


def test_no_group_straddles_folds_and_folds_stay_stratified():
    rng = np.random.default_rng(4)
    n, k = 6000, 5
    groups = _random_groups(rng, n)
    # images of a group share most labels (one protein), with some per-image noise
    base = {g: _random_labels(rng, 1, empty=0)[0] for g in sorted(set(groups))}
    labels = [sorted(set(base[g]) | ({int(rng.integers(19))} if rng.random() < 0.1 else set())) for g in groups]
    folds = stratified_group_folds(labels, groups, k, seed=1)
    assert not _straddling(groups, folds)
    per_image = stratified_folds(labels, k, seed=1)
    assert len(_straddling(groups, per_image)) > 500  # the leak that grouping removes
    counts = fold_class_counts(labels, folds, k)
    totals = counts.sum(axis=0)
    assert (counts >= 1).all()
    # Per class: whole groups of up to 6 images, most with 2-3 labels, placed for the rarer
    # labels before a common label's turn, cannot be taken back: a class is off its share by up
    # to ~20 images of ~120 here (rng seeds 0-7: 4 to 21; per image under 1), a third or less
    # of a random split of the same groups (44 to 69).
    dev = np.abs(counts - totals / k).max()
    order = sorted(set(groups))
    random_fold = dict(zip(order, np.random.default_rng(0).permutation(len(order)) % k))
    random_dev = np.abs(fold_class_counts(labels, [random_fold[g] for g in groups], k) - totals / k).max()
    assert dev <= 25 and dev < 0.5 * random_dev, (dev, random_dev)
    # Fold sizes: the algorithm serves labels, not sizes, so whole groups leave folds less even
    # than per image (up to ~4% of N/k seen here, 1% per image); 6% is the bar.
    sizes = np.bincount(folds, minlength=k)
    assert np.abs(sizes - n / k).max() <= 0.06 * n / k


def test_rare_class_in_k_groups_reaches_every_fold():
    rng = np.random.default_rng(2)
    k = 5
    labels, groups = [], []
    for g in range(400):  # common groups: Nucleoplasm, Cytosol...
        for _ in range(int(rng.integers(1, 4))):
            labels.append([0] if g % 2 else [16, 0])
            groups.append(f"common{g}")
    # Mitotic spindle in exactly k groups of very unequal sizes (1 to 9 images each)
    for g, size in enumerate([9, 1, 5, 2, 7]):
        labels += [[11, 0]] * size
        groups += [f"rare{g}"] * size
    # Aggresome in k - 1 groups: cannot reach every fold
    for g in range(k - 1):
        labels += [[15]] * 3
        groups += [f"aggr{g}"] * 3
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    groups = [groups[i] for i in order]
    for seed in range(5):
        folds = stratified_group_folds(labels, groups, k, seed)
        assert not _straddling(groups, folds)
        counts = fold_class_counts(labels, folds, k)
        assert (counts[:, 11] >= 1).all(), counts[:, 11]
        assert sorted(counts[:, 15].tolist()) == [0, 3, 3, 3, 3]


def test_group_folds_are_deterministic_from_the_seed():
    rng = np.random.default_rng(8)
    labels = _random_labels(rng, 2000)
    groups = _random_groups(rng, 2000)
    a = stratified_group_folds(labels, groups, 5, seed=7)
    assert np.array_equal(a, stratified_group_folds(labels, list(groups), 5, seed=7))
    b = stratified_group_folds(labels, groups, 5, seed=8)
    assert not np.array_equal(a, b)
    assert not _straddling(groups, b)


def test_group_folds_edge_cases():
    assert stratified_group_folds([[1], [2]], ["a", "b"], 1).tolist() == [0, 0]
    assert stratified_group_folds([], [], 3).tolist() == []
    # unlabelled groups fill the folds by size: a group of 3 unlabelled images stays together
    folds = stratified_group_folds([[], [], [], [3], [3], [3]], ["u", "u", "u", "a", "b", "c"], 3, seed=0)
    assert len(set(folds[:3].tolist())) == 1 and sorted(folds[3:].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="outside"):
        stratified_group_folds([[19]], ["a"], 2)
    with pytest.raises(ValueError, match="2 groups for 1 items"):
        stratified_group_folds([[1]], ["a", "b"], 2)


def test_group_folds_are_fast_on_100k_images():
    import time

    rng = np.random.default_rng(0)
    labels = _random_labels(rng, 100_000)
    groups = _random_groups(rng, 100_000)
    t = time.perf_counter()
    folds = stratified_group_folds(labels, groups, 5, seed=0)
    assert time.perf_counter() - t < 5.0
    assert not _straddling(groups, folds)


def test_real_public_hpa_list_wells_never_straddle_folds(shared_data):
    rows = read_labels_csv(str(shared_data / "hpa_public" / "public_hpa_labels.csv"))
    assert len(rows) == 67579
    ids = [i for i, _ in rows]
    labels = [ls for _, ls in rows]
    groups = [group_of(i) for i in ids]
    assert all(g.startswith("well:") for g in groups)
    k = 5
    folds = stratified_group_folds(labels, groups, k, seed=0)
    assert not _straddling(groups, folds)
    assert len(_straddling(groups, stratified_folds(labels, k, seed=0))) > 10_000  # per image: leaks
    counts = fold_class_counts(labels, folds, k)
    class_groups = [set() for _ in range(NUM_CLASSES)]
    for g, ls in zip(groups, labels):
        for c in ls:
            class_groups[c].add(g)
    enough = np.array([len(s) >= k for s in class_groups])
    assert enough.sum() >= 15
    assert (counts[:, enough] >= 1).all()
    totals = counts.sum(axis=0)
    assert np.abs(counts - totals / k).max() <= 2  # a well has at most 2 fields here
    # fold sizes within 2% of N/k (1.1-1.3% seen for seeds 0-3; per image 0.4-0.7%)
    sizes = np.bincount(folds, minlength=k)
    assert np.abs(sizes - len(ids) / k).max() <= 0.02 * len(ids) / k


# -- the auto rule and label-list columns ----------------------------------------------------

def test_auto_rule_on_the_three_id_kinds():
    assert group_of("1000_A2_1") == group_of("1000_A2_3") == "well:1000_A2"
    assert group_of("1000_A3_1") == "well:1000_A3" and group_of("57_F11_1") == "well:57_F11"
    assert group_of("10005_921_B9_1") == group_of("10005_1033_H12_2") == "antibody:10005"
    uuid = "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"
    for other in (uuid, "syn_0003", "1000_A2", "1000_A2_1_x", "A_1000_2", "1000_22_1", ""):
        assert group_of(other) == f"image:{other}", other
    # kinds never collide: an antibody number equal to a plate_well, or an ID spelt like a key
    assert len({group_of("1000_A2_1"), group_of("1000_1_A2_1"), group_of("well:1000_A2")}) == 3


def _labels_csv(path: Path, header: str, rows: list[str]) -> str:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return str(path)


def test_group_by_column_and_rows_without_a_group(tmp_path):
    a = _labels_csv(tmp_path / "a.csv", "ID,Label,Antibody",
                    ["x1,0,HPA001", "x2,1,HPA001", "x3,2,", "x4,3|19,HPA002", "x5,4,HPA003"])
    b = _labels_csv(tmp_path / "b.csv", "ID,Label,Cellline,Antibody", ["y1,5,U2OS,HPA002"])
    cfg = make_config(images="imgs", labels=(a, b), out=str(tmp_path / "o"), group_by="Antibody")
    entries, skipped = planlib.read_entries(cfg)
    assert [(e.image_id, e.group) for e in entries] == [
        ("x1", "Antibody:HPA001"), ("x2", "Antibody:HPA001"), ("x5", "Antibody:HPA003"), ("y1", "Antibody:HPA002")]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert reasons["x3"] == "empty Antibody (the --group-by column): no fold group"
    assert "label 19 outside" in reasons["x4"]
    for by, want in (("auto", "image:x1"), ("image", "image:x1")):
        e = planlib.read_entries(make_config(images="imgs", labels=a, out="o", group_by=by))[0][0]
        assert e.group == want


def test_a_label_list_without_the_column_stops_before_any_image_is_read(tmp_path, capsys):
    from tfrecords_builder.__main__ import main as cli_main

    a = _labels_csv(tmp_path / "a.csv", "ID,Label,Antibody", ["x1,0,HPA001"])
    b = _labels_csv(tmp_path / "b.csv", "ID,Label,Cellline", ["y1,5,U2OS"])
    out = tmp_path / "out"
    cfg = make_config(images=str(tmp_path / "no_images"), labels=(a, b), out=str(out), group_by="Antibody",
                      workers=0)
    with pytest.raises(ValueError) as err:
        buildlib.build(cfg, progress=False, log=lambda s: None)
    assert str(err.value) == f"--group-by Antibody: {b} has no column 'Antibody' (its columns: ID, Label, Cellline)"
    assert not out.exists()  # nothing planned, nothing decoded
    empty = _labels_csv(tmp_path / "empty.csv", "ID,Label", [])  # a header and no rows: still checked
    rc = cli_main(["--images", "imgs", "--labels", empty, "--out", str(out), "--group-by", "Antibody"])
    assert rc == 1 and "has no column 'Antibody' (its columns: ID, Label)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="group_by"):
        make_config(group_by=" ")


def test_old_plans_read_with_per_image_groups():
    plan = planlib.Plan({"folds": 2}, [planlib.Entry("1_A1_1", [0], "s", "o row 1", 1, "fold1-00000-of-00001.tfrec",
                                                     "well:1_A1")], [])
    again = planlib.Plan.from_json(plan.to_json())
    assert again.entries == plan.entries
    old = json.loads(plan.to_json())
    old["entries"] = [e[:6] for e in old["entries"]]
    [e] = planlib.Plan.from_json(json.dumps(old)).entries
    assert (e.image_id, e.fold, e.group) == ("1_A1_1", 1, "image:1_A1_1")


# -- end to end ------------------------------------------------------------------------------

WELLS = ["7_A1", "7_A1", "7_A1", "7_A2", "7_A2", "7_B5", "7_B5", "7_B5", "8_C3", "8_C3", "8_D10", "8_D10"]


@pytest.fixture(scope="module")
def wells12(tmp_path_factory) -> Path:
    """12 synthetic images renamed to public-HPA IDs: 5 wells of 2-3 fields. Each well's
    fields carry the well's labels (its first image's), as in the public list."""
    from testkit import synthetic

    src = tmp_path_factory.mktemp("syn12g")
    synthetic.generate(str(src), n=12, size=96, seed=5)
    out = tmp_path_factory.mktemp("wells12")
    (out / "images").mkdir()
    truth = read_labels_csv(str(src / "train.csv"))
    well_labels: dict[str, str] = {}
    lines = ["ID,Label,Cellline"]
    field = defaultdict(int)
    for (syn_id, labels), well in zip(truth, WELLS):
        field[well] += 1
        new_id = f"{well}_{field[well]}"
        for channel in ("red", "green", "blue", "yellow"):
            shutil.copy(src / "images" / f"{syn_id}_{channel}.png", out / "images" / f"{new_id}_{channel}.png")
        label = well_labels.setdefault(well, "|".join(str(c) for c in labels))
        lines.append(f"{new_id},{label},U2OS")
    (out / "train.csv").write_text("\n".join(lines) + "\n")
    return out


def _cfg(data: Path, out: Path, **kw):
    return make_config("smoke", images=str(data / "images"), labels=str(data / "train.csv"), out=str(out),
                       **{"limit": 0, "size": 32, "shard_mb": 0.004, "workers": 0, "folds": 2, **kw})


def _record_folds(out: Path) -> dict[str, int]:
    import tensorflow as tf

    from common import features

    files = sorted(str(p) for p in out.glob("fold*.tfrec"))
    ds = tf.data.TFRecordDataset(files).map(features.parse)
    return {ex["image_id"].numpy().decode(): int(ex["fold"].numpy()) for ex in ds}


def test_local_build_keeps_wells_in_one_fold_and_the_manifest_records_groups(wells12, tmp_path):
    logs: list[str] = []
    cfg = _cfg(wells12, tmp_path / "out", seed=0)
    result = buildlib.build(cfg, progress=False, log=logs.append)
    assert result.exit_code == 0
    m = result.manifest
    assert m == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["group_by"] == "auto"
    images = m["images"]
    assert len(images) == 12
    for image_id, info in images.items():
        assert info["group"] == "well:" + image_id.rsplit("_", 1)[0]
    fold_of = _record_folds(tmp_path / "out")  # the folds in the records themselves
    assert fold_of == {i: info["fold"] for i, info in images.items()}
    assert not _straddling([images[i]["group"] for i in fold_of], list(fold_of.values()))
    order = [i for i, _ in read_labels_csv(str(wells12 / "train.csv"))]  # the plan's order
    per_image = stratified_folds([images[i]["labels"] for i in order], 2, seed=0)
    assert _straddling([images[i]["group"] for i in order], per_image)  # what --group-by image would leak

    g = m["groups"]
    assert (g["by"], g["count"], g["largest"], g["largest_group"]) == ("auto", 5, 3, "well:7_A1")
    wells_per_fold = [len({info["group"] for info in images.values() if info["fold"] == f}) for f in range(2)]
    assert g["per_fold"] == wells_per_fold and sum(wells_per_fold) == 5
    # classes in a single well: they cannot reach both folds; listed, and warned about once
    class_wells = defaultdict(set)
    for info in images.values():
        for c in info["labels"]:
            class_wells[c].add(info["group"])
    thin = sorted(c for c, ws in class_wells.items() if len(ws) < 2)
    assert thin, "the fixture should have a class in one well"
    assert [t["class"] for t in g["thin_classes"]] == thin
    assert all(t["groups"] == 1 and t["folds"] == 1 and t["name"] == CLASS_NAMES[t["class"]] for t in g["thin_classes"])
    warnings = [line for line in logs if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{len(thin)} class(es) in fewer fold groups than the 2 folds" in warnings[0]
    assert all(CLASS_NAMES[c] in warnings[0] for c in thin)
    # a finished build is not re-planned: no second warning
    logs.clear()
    buildlib.build(cfg, progress=False, log=logs.append)
    assert logs == [f"{cfg.out}: already complete"]

    # --group-by image: the old per-image folds, exactly
    img = buildlib.build(_cfg(wells12, tmp_path / "img", seed=0, group_by="image"), progress=False, log=lambda s: None)
    folds = [img.manifest["images"][i]["fold"] for i in order]
    assert folds == per_image.tolist()
    assert img.manifest["groups"]["count"] == 12 and img.manifest["groups"]["largest"] == 1


def test_local_build_grouped_by_a_label_list_column(synthetic_small, tmp_path):
    truth = read_labels_csv(str(synthetic_small / "train.csv"))
    antibodies = ["HPA1", "HPA1", "HPA2", "HPA2", "HPA2", ""]
    lines = ["ID,Label,Antibody"] + [f"{i},{'|'.join(map(str, ls))},{a}" for (i, ls), a in zip(truth, antibodies)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    cfg = make_config("smoke", images=str(synthetic_small / "images"), labels=str(labels), out=str(tmp_path / "out"),
                      size=32, workers=0, group_by="Antibody")
    result = buildlib.build(cfg, progress=False, log=lambda s: None)
    m = result.manifest
    assert result.exit_code == 2 and [s["id"] for s in m["skipped"]] == [truth[5][0]]
    assert "empty Antibody" in m["skipped"][0]["reason"]
    groups = {i: info["group"] for i, info in m["images"].items()}
    assert sorted(set(groups.values())) == ["Antibody:HPA1", "Antibody:HPA2"]
    assert not _straddling(list(groups.values()), [m["images"][i]["fold"] for i in groups])
    assert sorted(m["groups"]["per_fold"]) == [1, 1] and m["groups"]["largest"] == 3


def _interrupted(cfg, monkeypatch) -> None:
    """A build killed after its last shard, before the manifest: plan and done records stay."""
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        buildlib.build(cfg, progress=False, log=lambda s: None)
    monkeypatch.undo()
    assert (Path(cfg.out) / buildlib.STATE_DIR / buildlib.PLAN_FILE).exists()


def _make_old_plan(out: Path) -> None:
    """Rewrite a plan as builds before --group-by wrote it: no group_by, 6 fields per entry."""
    path = out / buildlib.STATE_DIR / buildlib.PLAN_FILE
    plan = json.loads(path.read_text())
    del plan["config"]["group_by"]
    plan["entries"] = [e[:6] for e in plan["entries"]]
    path.write_text(json.dumps(plan, sort_keys=True) + "\n")


def test_resume_with_another_group_by_is_refused(wells12, tmp_path, monkeypatch):
    cfg = _cfg(wells12, tmp_path / "out")
    _interrupted(cfg, monkeypatch)
    with pytest.raises(ResumeError) as err:
        buildlib.build(_cfg(wells12, tmp_path / "out", group_by="image"), progress=False, log=lambda s: None)
    assert "holds an unfinished build with another config (group_by: 'auto' then, 'image' now)" in str(err.value)
    done = buildlib.build(cfg, progress=False, log=lambda s: None)  # the same command finishes it
    assert done.exit_code == 0 and done.shards_reused == len(done.manifest["shards"])
    refused = r"finished build with another config \(group_by: 'auto' then, 'Cellline' now\)"
    with pytest.raises(ResumeError, match=refused):
        buildlib.build(_cfg(wells12, tmp_path / "out", group_by="Cellline"), progress=False, log=lambda s: None)


def test_plans_and_manifests_from_before_group_by_resume_per_image(wells12, synthetic_small, tmp_path, monkeypatch):
    # Per-image IDs (synthetic, like the competition's UUIDs): auto finds no group, the resume goes on.
    syn = _cfg(synthetic_small, tmp_path / "syn")
    ref = buildlib.build(_cfg(synthetic_small, tmp_path / "syn_ref"), progress=False, log=lambda s: None)
    _interrupted(syn, monkeypatch)
    _make_old_plan(tmp_path / "syn")
    resumed = buildlib.build(syn, progress=False, log=lambda s: None)
    assert resumed.exit_code == 0 and resumed.shards_built == 0
    assert {i: v["fold"] for i, v in resumed.manifest["images"].items()} == \
        {i: v["fold"] for i, v in ref.manifest["images"].items()}

    # Well IDs: auto would group them, so the old per-image plan is refused with the way out.
    out = tmp_path / "wells"
    _interrupted(_cfg(wells12, out, group_by="image"), monkeypatch)
    plan_before = json.loads((out / buildlib.STATE_DIR / buildlib.PLAN_FILE).read_text())
    _make_old_plan(out)
    with pytest.raises(ResumeError) as err:
        buildlib.build(_cfg(wells12, out), progress=False, log=lambda s: None)
    msg = str(err.value)
    assert "group_by: 'image' then, 'auto' now" in msg
    assert "made before --group-by, with per-image folds: pass --group-by image to finish it" in msg
    finished = buildlib.build(_cfg(wells12, out, group_by="image"), progress=False, log=lambda s: None)
    assert finished.exit_code == 0 and finished.shards_built == 0
    assert {i: v["fold"] for i, v in finished.manifest["images"].items()} == {
        e[0]: e[4] for e in plan_before["entries"]}
    assert all(v["group"] == f"image:{i}" for i, v in finished.manifest["images"].items())

    # A finished folder from before --group-by: no group_by, no groups, no per-image group.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["group_by"], manifest["groups"]
    for info in manifest["images"].values():
        del info["group"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    with pytest.raises(ResumeError, match="pass --group-by image"):
        buildlib.build(_cfg(wells12, out), progress=False, log=lambda s: None)
    again = buildlib.build(_cfg(wells12, out, group_by="image"), progress=False, log=lambda s: None)
    assert again.shards_built == 0 and again.manifest == manifest  # read as it is, not rewritten
    # ... and the trainer still reads its counts
    counts = shard_folder.shard_counts(str(out))
    assert sorted(counts) == sorted(s["name"] for s in manifest["shards"])
    assert sum(c.examples for c in counts.values()) == 12
