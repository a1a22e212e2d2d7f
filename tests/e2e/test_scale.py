"""Issue 31, items 1 and 3, through the real command: activation checkpointing (--gradient_checkpointing) gives
the same per-step losses and exported tensors as a run without it, under ZeRO-3 on 2 ranks, on a decoder and an
encoder; a backbone class that cannot checkpoint is refused before any weight loads; --bf16 on CPU trains in
bf16 with fp32 trainables. The prompt's gradient itself: tests/unit/test_checkpointing.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_args
from infoprompt_ds.env import free_port

pytestmark = pytest.mark.e2e
STEPS = 3


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _losses(out: Path) -> list[float]:
    import mlflow

    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


def _two_rank_zero3(model: str, files: dict, out: Path, **over) -> Path:
    args = ["--deepspeed", "zero3", *tiny_args(model, files, out, max_steps=STEPS, eval_steps=STEPS, **over)]
    _ok(run_cli(args, launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]))
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"], ids=["decoder", "encoder"])
def test_checkpointing_matches_the_plain_run_under_zero3_on_two_ranks(request, fixture, sentiment_files, tmp_path):
    model = request.getfixturevalue(fixture)
    plain = _two_rank_zero3(model, sentiment_files, tmp_path / "plain")
    ckpt = _two_rank_zero3(model, sentiment_files, tmp_path / "ckpt", gradient_checkpointing="true")
    a, b = _losses(plain), _losses(ckpt)
    assert len(a) == STEPS and b == pytest.approx(a, rel=0, abs=1e-5)
    ta = load_file(str(plain / "export" / "infoprompt.safetensors"))
    tb = load_file(str(ckpt / "export" / "infoprompt.safetensors"))
    assert ta.keys() == tb.keys() and "prompt.weight" in ta
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-5, msg=k)
    assert a[-1] != a[0]  # the steps did update the prompt
    assert json.loads((ckpt / "config.json").read_text())["gradient_checkpointing"] is True


def test_a_class_that_cannot_checkpoint_is_refused_before_loading(tiny_bert, sentiment_files, tmp_path):
    """MPNet (all-mpnet-base-v2's family) has no activation checkpointing in transformers. The folder holds
    no weights at all: a refusal after loading would name the missing weights instead."""
    from transformers import MPNetConfig

    model = tmp_path / "tiny_mpnet"
    shutil.copytree(tiny_bert, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json"))
    MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=80).save_pretrained(model)
    out = tmp_path / "run"
    proc = run_cli(tiny_args(str(model), sentiment_files, out, gradient_checkpointing="true"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: gradient_checkpointing: ") and "MPNet" in lines[0], lines
    assert not (out / "config.json").exists()


def test_bf16_on_cpu_stores_bf16_weights_and_keeps_fp32_trainables(tiny_llama, sentiment_files, tmp_path):
    """--bf16 true on CPU (DeepSpeed's CPU accelerator, ZeRO-3): the frozen weights are held in bf16 and the
    matmuls run in bf16, while the optimizer keeps fp32 masters of the trainables, and the export is those
    masters: trained values that bf16 cannot represent (a bf16 copy cast to fp32 could not have them)."""
    out = tmp_path / "bf16"
    _ok(run_cli(tiny_args(tiny_llama, sentiment_files, out, bf16="true", method="prompt", max_steps=12,
                          eval_steps=12)))
    assert json.loads((out / "ranks" / "rank0.json").read_text())["backbone_dtypes"] == ["bfloat16"]
    assert json.loads((out / "ds_config.json").read_text())["bf16"]["enabled"] is True
    tensors = load_file(str(out / "export" / "infoprompt.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert (tensors["prompt.weight"] != tensors["prompt.weight"].bfloat16().float()).any()
    losses = _losses(out)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_bench_bf16_smoke(tiny_llama, tmp_path):
    """benchmarks/bench_bf16.py on the tiny Llama: both engines built, pairs timed, the file written (no timing
    asserted)."""
    import sys

    from conftest import assert_results_meta

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_bf16

    out = tmp_path / "bf16.json"
    bench_bf16.main(["--model_path", tiny_llama, "--out", str(out)])
    doc = json.loads(out.read_text())
    assert_results_meta(doc)
    (row,) = doc["rows"]
    assert row["backbone_dtypes"] == {"fp32": ["torch.float32"], "bf16": ["torch.bfloat16"]}
    assert len(row["ratio_bf16_to_fp32_pairs"]) == 2 and row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    assert all(math.isfinite(v) for v in row["first_step_loss"].values())


def test_bench_checkpointing_smoke(tmp_path):
    """benchmarks/bench_checkpointing.py, one 1-rank ZeRO-3 cell: both runs, their equality, the gather counts."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ckpt.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_checkpointing.py"), "--cells",
                           "llama-tiny:zero3:1", "--steps", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "INFOPROMPT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["equal_within_1e-5"] and cell["plain"]["returncode"] == cell["checkpointed"]["returncode"] == 0
    assert cell["checkpointed"]["ranks"][0]["backwards"] == 2 and "gathers" in cell["checkpointed"]["ranks"][0]
