"""The memory planner (runtime/plan.py) against every measured peak in benchmarks/results: each row of
plan_vs_measured.json carries the run's settings; the estimate is recomputed here from them (no training)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from infoprompt_ds.runtime.plan import GIB, Setup, Shape, activation_bytes, estimate

ROWS = json.loads((ROOT / "benchmarks" / "results" / "plan_vs_measured.json").read_text())["rows"]


@pytest.mark.parametrize("row", [r for r in ROWS if "setup" in r], ids=lambda r: f"{r['source']}:{r['cell']}")
def test_planner_reproduces_measured_peaks(row):
    plan = estimate(Shape(**row["shape"]), Setup(**row["setup"]))
    planned = plan.host_train_bytes if row["measured_kind"] == "peak_anon_train" else plan.host_peak_bytes
    assert planned == row["planned_bytes"]  # the json was written by this planner
    if row.get("excluded"):
        pytest.skip(row["excluded"])
    assert abs(planned / row["measured_bytes"] - 1) <= 0.2, (planned / GIB, row["measured_bytes"] / GIB)


def test_large_runs_within_tolerance():
    """The benchmark rows (7B NVMe, 3B CPU offload): planned host peak within 20% of the measured one."""
    large = [r for r in ROWS if r["source"] == "scale_large.json"]
    for r in large:
        assert abs(r["planned_gib"] / r["measured_gib"] - 1) <= 0.2, r


def test_checkpointing_keeps_one_layer():
    """Activation checkpointing: ℓ layer inputs (b bytes per value) + one layer's 34 bytes per value, vs ℓ
    layers of 34 (Korthikanti, flash attention): 7B, B 8, L 2048, bf16."""
    shape = Shape(params=6_738_415_616, largest=32000 * 4096, hidden=4096, layers=32, heads=32, vocab=32000)
    base = dict(stage=3, ranks=1, micro_batch=8, positions=2048, bytes_per_weight=2, offload_param=None,
                offload_optimizer=None, gather_one_at_a_time=True, trainable=0, on_gpu=True)
    plain = activation_bytes(shape, Setup(checkpointing=False, **base))
    ckpt = activation_bytes(shape, Setup(checkpointing=True, **base))
    tokens = 8 * 2048 * 4096
    assert plain == 32 * tokens * 34 and ckpt == 32 * tokens * 2 + tokens * 34
    assert plain / 1e9 > 70 and ckpt < plain / 10  # docs/scaling.md: ~73 GB without


def test_zero3_shards_and_offload_moves_weights():
    shape = Shape(params=10**9, largest=10**8, hidden=2048, layers=22, heads=32, vocab=32000)
    base = dict(stage=3, micro_batch=1, positions=64, bytes_per_weight=2, checkpointing=False,
                offload_optimizer=None, gather_one_at_a_time=True, trainable=10**6, on_gpu=True)
    one, eight = (estimate(shape, Setup(ranks=n, offload_param=None, **base)) for n in (1, 8))
    assert one.device["weights"] == 2 * 10**9 and eight.device["weights"] == 2 * 10**9 // 8
    cpu = estimate(shape, Setup(ranks=8, offload_param="cpu", **base))
    assert cpu.device["weights"] == 0 and cpu.host["weights"] == 2 * 10**9 // 8
    nvme = estimate(shape, Setup(ranks=8, offload_param="nvme", swap_buffer_bytes=10**9, **base))
    assert nvme.nvme_bytes == 2 * 10**9 and nvme.host["swap_buffers"] == 10**9 and nvme.host["weights"] == 0
