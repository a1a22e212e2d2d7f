"""Issue 34 item 7: faults under ZeRO-Infinity (frozen weights swapped to files in --offload_dir, through
DeepSpeed's async_io op). A real `python train.py --deepspeed zero3_nvme` run is SIGKILLed while it trains
(every forward swaps the weights in and out) after its first complete checkpoint; the resume, on another
offload folder, ends bitwise equal to an uninterrupted run: nothing lost, and the swap folder is scratch."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_args
from reliability_lib import fill, kill_session, launch, python_cmd, record_case, small_tmpfs, wait_until

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "offload_faults")


@pytest.fixture(scope="module")
def wide_bert(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT's tokenizer on a 1-layer, 512-wide BERT: DeepSpeed swaps only tensors of at least 1 MiB
    to NVMe (tests/e2e/test_scale_large.py), and its 512 x 512 fp32 weights are."""
    import shutil
    from pathlib import Path

    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("wide_bert")
    config = BertConfig.from_pretrained(tiny_bert)
    config.update(dict(hidden_size=512, num_hidden_layers=1, num_attention_heads=4, intermediate_size=1024))
    torch.manual_seed(0)
    BertModel(config).save_pretrained(d)
    for f in Path(tiny_bert).iterdir():
        if f.suffix in (".txt",) or "token" in f.name:
            shutil.copy(f, d / f.name)
    return str(d)


def _args(model, files, out, offload, **over):
    return tiny_args(model, files, out, **{"deepspeed": "zero3_nvme", "offload_dir": str(offload), "method": "prompt",
                                           "max_steps": 12, "save_steps": 2, "eval_steps": 1000, **over})


@pytest.fixture(scope="module")
def nvme_reference(wide_bert, sentiment_files, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("nvme_ref")
    r = run_cli(_args(wide_bert, sentiment_files, tmp / "ref", tmp / "swap"))
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(tmp / "ref" / "export" / "infoprompt.safetensors"))


def _interrupt(args: list[str], out, log, sig: int, swap=None) -> int:
    """Start a real run, send `sig` once its first checkpoint is complete (it is still training), wait."""
    proc = launch(python_cmd(args), log)
    try:
        assert wait_until(lambda: (out / "checkpoints" / "latest").exists(), 600, proc), log.read_text()[-3000:]
        if swap is not None:
            assert any(swap.rglob("*.swp")), "no swap files: nothing was offloaded"
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(sig)
        return proc.wait(timeout=300)
    finally:
        kill_session(proc)


def _bitwise(a: dict, export) -> None:
    b = load_file(str(export / "infoprompt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.mark.parametrize("sig,rc", [(signal.SIGKILL, -9), (signal.SIGTERM, 75)])
def test_a_stop_under_nvme_offload_resumes_bitwise_on_another_offload_folder(sig, rc, nvme_reference, wide_bert,
                                                                             sentiment_files, tmp_path):
    from infoprompt_ds.runtime.checkpoint import resolve_checkpoint

    out, log = tmp_path / "run", tmp_path / "log"
    assert _interrupt(_args(wide_bert, sentiment_files, out, tmp_path / "swap_a"), out, log, sig,
                      tmp_path / "swap_a") == rc, log.read_text()[-3000:]
    assert resolve_checkpoint("latest", str(out)).name != "step12"
    r = run_cli(_args(wide_bert, sentiment_files, out, tmp_path / "swap_b", resume_from_checkpoint="latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: deepspeed" not in r.stdout  # another offload folder is not an edit of the json
    _bitwise(nvme_reference, out / "export")


def _ckpt_args(tiny_bert, files, out, **over):
    return tiny_args(tiny_bert, files, out, **{"gradient_checkpointing": "true", "max_steps": 40, "save_steps": 2,
                                              "eval_steps": 1000, **over})


@pytest.fixture(scope="module")
def ckpt_reference(tiny_bert, sentiment_files, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ckpt_ref") / "ref"
    r = run_cli(_ckpt_args(tiny_bert, sentiment_files, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(out / "export" / "infoprompt.safetensors"))


@pytest.mark.parametrize("sig,rc", [(signal.SIGKILL, -9), (signal.SIGTERM, 75)])
def test_a_stop_during_a_checkpointed_backward_resumes_bitwise(sig, rc, ckpt_reference, tiny_bert, sentiment_files,
                                                               tmp_path):
    """--gradient_checkpointing (ZeRO-3): the backward recomputes each layer's forward; a SIGKILL or SIGTERM
    while it trains loses nothing, and the resume ends bitwise equal to an uninterrupted run."""
    out, log = tmp_path / "run", tmp_path / "log"
    assert _interrupt(_ckpt_args(tiny_bert, sentiment_files, out), out, log, sig) == rc, log.read_text()[-3000:]
    r = run_cli(_ckpt_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    _bitwise(ckpt_reference, out / "export")


def test_the_offload_folder_vanishing_mid_run_is_one_line(wide_bert, sentiment_files, tmp_path):
    """Was a DeepSpeed AssertionError traceback (its async read of a swap file that is gone), exit 1."""
    import shutil

    from mlflow import MlflowClient

    from reliability_lib import stderr_lines

    out, log, swap = tmp_path / "run", tmp_path / "log", tmp_path / "swap"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = launch(python_cmd(_args(wide_bert, sentiment_files, out, swap, max_steps=400)), log,
                  env={"MLFLOW_TRACKING_URI": uri})
    try:
        assert wait_until(lambda: (out / "checkpoints" / "latest").exists(), 600, proc), log.read_text()[-3000:]
        shutil.rmtree(swap)
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc)
    text = log.read_text()
    errors = [ln for ln in stderr_lines(text) if ln.startswith("error: ")]
    assert rc == 2 and "Traceback" not in text, text[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: offload_dir: ") and str(swap) in errors[0], errors
    assert "vanished during training" in errors[0] or "deleted or damaged during training" in errors[0], errors
    assert "the last complete checkpoint is step" in errors[0]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FAILED" and str(swap) in run.data.tags["infoprompt.error"]


def test_a_full_offload_folder_mid_run_loses_nothing(nvme_reference, wide_bert, sentiment_files, tmp_path):
    """--offload_dir on a small tmpfs (root only) filled up once the first checkpoint is complete: the swap
    files were allocated at start-up and are rewritten in place, so the run trains to the end, bitwise equal
    to the reference."""
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        out, log = tmp_path / "run", tmp_path / "log"
        proc = launch(python_cmd(_args(wide_bert, sentiment_files, out, disk / "swap")), log)
        try:
            assert wait_until(lambda: (out / "checkpoints" / "latest").exists(), 600, proc), log.read_text()[-3000:]
            fill(disk / "ballast")
            assert proc.poll() is None, "the run ended before its offload folder was full"
            rc = proc.wait(timeout=300)
        finally:
            kill_session(proc)
        assert rc == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
        _bitwise(nvme_reference, out / "export")
