"""Issue 31 (large backbones): ZeRO-Infinity NVMe offload end to end on a tiny model, its bad-input
refusals, and the memory planner against a measured tiny run. The large runs are benchmarks
(benchmarks/bench_scale_large.py), not tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_args


def _anon_bytes(pid: int) -> int:
    """RssAnon of the training process (what the planner estimates and the OOM killer counts); the short
    compiler processes DeepSpeed's op checks start are not part of the run's memory."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


@pytest.fixture(scope="module")
def wide_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama's tokenizer on a 1-layer, 512-wide Llama: DeepSpeed swaps only tensors of at least
    1 MiB (max(MIN_AIO_BYTES, aio.block_size)) to NVMe, and every weight here is (512 x 512 fp32 = 1 MiB)."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaModel

    d = tmp_path_factory.mktemp("wide_llama")
    config = AutoConfig.from_pretrained(tiny_llama)
    config.update(dict(hidden_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=1024))
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(d)
    for f in Path(tiny_llama).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    return str(d)


@pytest.fixture(scope="module")
def nvme_run(wide_llama, sentiment_files, tmp_path_factory):
    """One zero3_nvme run of the tiny Llama, watched: (process, stdout, peak anon bytes, peak swap bytes)."""
    tmp = tmp_path_factory.mktemp("nvme")
    offload = tmp / "swap"
    args = tiny_args(wide_llama, sentiment_files, tmp / "run", deepspeed="zero3_nvme", method="prompt",
                     max_steps=2, eval_steps=2, offload_dir=offload)
    log = open(tmp / "log.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak_anon = peak_swap = 0
    while proc.poll() is None:  # DeepSpeed deletes its swap files when the engine goes: look while it runs
        peak_anon = max(peak_anon, _anon_bytes(proc.pid))
        try:
            peak_swap = max(peak_swap, sum(p.stat().st_size for p in offload.rglob("*.swp")))
        except OSError:
            pass
        time.sleep(0.1)
    log.seek(0)
    return proc.returncode, log.read(), peak_anon, peak_swap, tmp, wide_llama


def test_nvme_offload_end_to_end(nvme_run):
    """zero3_nvme trains, and the frozen weights really went to swap files in offload_dir: at their
    largest those held every weight of 1 MiB or more (all but the norms and the small embedding), in fp32."""
    rc, out, _, peak_swap, tmp, model = nvme_run
    assert rc == 0, out[-4000:]
    assert json.loads((tmp / "run" / "metrics.json").read_text())["test"]
    state = load_file(str(Path(model) / "model.safetensors"))
    big = sum(t.numel() for t in state.values() if t.numel() * 4 >= 2**20)
    assert big > 0 and peak_swap >= 4 * big, (peak_swap, 4 * big)


def test_plan_matches_a_measured_tiny_run(nvme_run):
    """Pre-flight's one-line estimate (host RAM, all ranks) is within 20% of the run's measured peak
    anonymous memory (sampled every 0.1 s over the process tree)."""
    rc, out, peak_anon, _, _, _ = nvme_run
    assert rc == 0, out[-4000:]
    planned = float(re.search(r"plan: .* (\d+\.\d+) GiB of host RAM in all", out).group(1)) * 2**30
    assert abs(planned / peak_anon - 1) <= 0.2, (planned / 2**30, peak_anon / 2**30)


def test_offload_dir_refused_before_start(tiny_llama, sentiment_files, tmp_path):
    """An offload_dir where no file can be created (sysfs refuses even root; under a file) and one on a
    filesystem without room for the swap: one line naming offload_dir, exit 2, before any weight loads."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for where, expect in (("/sys/infoprompt_offload", "cannot write"), (a_file / "swap", "is a file")):
        r = run_cli(tiny_args(tiny_llama, sentiment_files, tmp_path / "run", deepspeed="zero3_nvme",
                              offload_dir=where))
        assert r.returncode == 2, r.stderr[-2000:]
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: offload_dir:") and expect in line, r.stderr[-2000:]
        assert "Loading" not in r.stdout + r.stderr


def test_offload_dir_without_room_refused(tiny_llama, sentiment_files, tmp_path):
    """A filesystem without room for the swap: the backbone's config (no weights: nothing loads before the
    check) says 2^40 parameters, 4 TiB of fp32 swap, more than any test machine's disk has free."""
    import shutil

    from transformers import AutoConfig

    model = tmp_path / "huge"
    model.mkdir()
    config = AutoConfig.from_pretrained(tiny_llama)
    config.update(dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=2**34))
    config.save_pretrained(model)
    for f in Path(tiny_llama).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, model / f.name)
    r = run_cli(tiny_args(str(model), sentiment_files, tmp_path / "run", deepspeed="zero3_nvme",
                          offload_dir=tmp_path / "swap"))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: offload_dir:") and "GiB free but the swap files need" in line, line


def test_libaio_missing_refused(tiny_llama, sentiment_files, tmp_path):
    """Where DeepSpeed's async_io op cannot be built, zero3_nvme fails before start-up with one line that
    says how to install libaio. The check is the op's own is_compatible(), which compiles and links a test
    program against libaio; with no working C compiler (CC=false) it is false, as it is without libaio."""
    r = run_cli(tiny_args(tiny_llama, sentiment_files, tmp_path / "run", deepspeed="zero3_nvme",
                          offload_dir=tmp_path / "swap"), env={"CC": "false"})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: deepspeed:") and "apt-get install -y libaio-dev" in line, line
    assert not (tmp_path / "swap").exists()
