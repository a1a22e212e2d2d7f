"""benchmarks/bench_scale.py on a tiny random Llama: 2 ranks under ZeRO-3, both methods, through the real
launcher and train.py. Checks the results file's fields and the facts the benchmark exists to show
(each rank holds about half the backbone; the checkpoint holds none of it), never a timing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.e2e
def test_bench_scale_tiny(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--tiny",
                           "--grid", "zero3:2", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**__import__("os").environ, "INFOPROMPT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    body = json.loads((out / "scale_tiny.json").read_text())
    assert {"command", "machine", "versions", "git"} <= set(body["meta"])
    cells = body["cells"]
    assert [c["method"] for c in cells] == ["infoprompt", "prompt"]
    for c in cells:
        assert c["returncode"] == 0 and c["world_size"] == 2 and c["ds_config"] == "zero3"
        assert "scale_rank.py" in c["command"] and "--num_gpus 2" in c["command"]
        assert [r["rank"] for r in c["ranks"]] == [0, 1]
        for r in c["ranks"]:
            assert r["peak_rss_bytes"] > 100 * 2**20 and r["load_s"] > 0 and r["wall_s"] >= r["load_s"]
            assert 0 < r["backbone_params_local"] < r["backbone_params_total"]
            assert r["backbone_bytes_local"] == 4 * r["backbone_params_local"]
        # ZeRO-3 shards the backbone; tiny params below the persistence threshold stay whole, so a
        # 2-layer toy is further from 1/2 than a real model: the goal (1/N + 5%) is checked on the real runs.
        assert c["backbone_fraction_max"] < 0.75
        assert len(c["step_s_all"]) == 3 and c["step_s"] > 0
        assert c["checkpoint_backbone_tensors"] == 0 and 0 < c["checkpoint_bytes"]
        assert c["export_bytes"] > 0 and 0.0 <= c["test_accuracy"] <= 1.0
    rows = list(csv.DictReader(open(out / "scale_tiny.csv")))
    assert len(rows) == 2 and rows[0]["cell"] == cells[0]["cell"]
    assert (out / "scale_tiny.png").stat().st_size > 10_000
