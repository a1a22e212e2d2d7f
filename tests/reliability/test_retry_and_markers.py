"""Issue 34, items 5 and 2: a failed start must not block the corrected retry, and a planted
mlflow_run.json must never end a tracking run this output folder did not start.

Item 5: a backbone folder without (or with truncated) weights is refused in pre-flight, in one line, before
the output folder or its lock exist; a folder where a run only started (config.json, ds_config.json, no
step) is not "another run". Item 2: real trainings against one shared sqlite store."""

from __future__ import annotations

import json
import signal
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_cli, tiny_args
from reliability_lib import assert_refused, prepare_in_process, record_case, stderr_lines

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "retry_markers")


def _model_copy(tiny_bert: str, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    return model


def _args(model, files, out: Path, **over):
    return tiny_args(str(model), files, out, **{"max_steps": 2, "save_steps": 2, "eval_steps": 1000, **over})


def test_model_without_weights_is_refused_before_anything_is_written(tiny_bert, sentiment_files, tmp_path):
    model = _model_copy(tiny_bert, tmp_path)
    (model / "model.safetensors").unlink()
    out = tmp_path / "run"
    assert_refused(_args(model, sentiment_files, out), "model_name_or_path", "has no weight files")
    assert not out.exists()


def test_truncated_weights_refused_fast_and_the_retry_runs(tiny_bert, sentiment_files, tmp_path):
    """A real process: the truncated file is named in one line well before any weight loads, nothing is
    written, and the corrected command into the same folder trains."""
    model = _model_copy(tiny_bert, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    started = time.time()
    r = run_cli(_args(model, sentiment_files, out))
    elapsed = time.time() - started
    lines = stderr_lines(r.stderr)
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: model_name_or_path: weight file ") and "truncated" in lines[0], lines
    assert not out.exists(), list(out.iterdir())
    assert elapsed < 30, elapsed  # was 33-41 s of loading before the refusal, on an idle machine
    weights.write_bytes(data)
    r = run_cli(_args(model, sentiment_files, out))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("damage,needle", [("shard", "is missing"), ("bin", "not a complete zip archive")])
def test_sharded_or_bin_weights_damaged(damage, needle, tiny_bert, sentiment_files, tmp_path):
    model = _model_copy(tiny_bert, tmp_path)
    (model / "model.safetensors").unlink()
    if damage == "shard":
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}}))
    else:
        import torch
        from transformers import BertModel

        torch.save(BertModel.from_pretrained(tiny_bert).state_dict(), model / "pytorch_model.bin")
        blob = (model / "pytorch_model.bin").read_bytes()
        (model / "pytorch_model.bin").write_bytes(blob[: len(blob) - 4096])
    assert_refused(_args(model, sentiment_files, tmp_path / "run"), "model_name_or_path", needle)


def test_a_folder_where_no_step_ran_is_not_another_run(tiny_bert, sentiment_files, tmp_path):
    """What a start that failed while loading left (before this fix wrote nothing): config.json,
    ds_config.json, an empty checkpoints/, a released lock. The same command again is accepted."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "ds_config.json").write_text("{}")
    (out / ".infoprompt.lock").write_text("pid 1 on elsewhere\n")
    code, lines, _ = prepare_in_process(_args(tiny_bert, sentiment_files, out))
    assert code == "accepted", lines
    (out / "checkpoints" / "step2").mkdir()  # a step saved (even incomplete): that is a run
    assert_refused(_args(tiny_bert, sentiment_files, out), "output_dir", "holds another run")


FORGER = """
import json, os, socket, sys
from infoprompt_ds.tracking.client import RUN_MARKER, Tracker
t = Tracker(enabled=True)  # another experiment's live run, started from another folder
victim = t.start("someone-else", sys.argv[1], "victim", None, {})
out = sys.argv[2]
os.makedirs(out)
with open(os.path.join(out, RUN_MARKER), "w") as f:  # a marker naming it, with a dead pid of this host
    json.dump({"run_id": victim, "uri": t.uri, "pid": 2**22 + 17, "host": socket.gethostname()}, f)
print(victim, flush=True)
"""


def test_a_forged_run_marker_never_ends_a_run_we_did_not_start(tiny_bert, sentiment_files, tmp_path):
    """Issue 34 item 2: a shared store; another folder's RUNNING run named by a planted mlflow_run.json. A
    fresh training in the planted folder leaves that run RUNNING, says so in one line, and ends its own."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    env = {"MLFLOW_TRACKING_URI": uri}
    out = tmp_path / "run"
    forged = subprocess.run([sys.executable, "-c", FORGER, str(tmp_path / "other"), str(out)], cwd=ROOT,
                            env={**__import__("os").environ, **env}, capture_output=True, text=True, timeout=300)
    assert forged.returncode == 0, forged.stderr[-2000:]
    victim = forged.stdout.split()[-1]
    client = MlflowClient(uri)
    assert client.get_run(victim).info.status == "RUNNING"
    r = run_cli(_args(tiny_bert, sentiment_files, out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert client.get_run(victim).info.status == "RUNNING"  # before: KILLED
    warned = [ln for ln in stderr_lines(r.stderr) if victim in ln]
    assert len(warned) == 1 and "no training in" in warned[0], warned
    own = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    assert own != victim and client.get_run(own).info.status == "FINISHED"


def test_sigusr1_during_start_up_is_the_documented_stop(tiny_bert, sentiment_files, tmp_path):
    """Issue 34 item 6: SIGUSR1 while the run starts (pre-flight has printed its plan; the weights are not
    loaded yet) used to kill it silently (rc -10). Now: the first step ends, a checkpoint, exit 75."""
    from infoprompt_ds.runtime.checkpoint import resolve_checkpoint
    from reliability_lib import kill_session, launch, python_cmd, wait_until

    out, log = tmp_path / "run", tmp_path / "log"
    proc = launch(python_cmd(_args(tiny_bert, sentiment_files, out, max_steps=5000, save_steps=0)), log)
    try:
        assert wait_until(lambda: "plan: " in log.read_text(), 300, proc), log.read_text()[-3000:]
        assert not (out / "ranks").exists()  # still starting: the engine is not built
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc)
    text = log.read_text()
    assert rc == 75, text[-3000:]
    assert "Traceback" not in text and "[stop] signal 10" in text, text[-3000:]
    assert resolve_checkpoint("latest", str(out)).name == "step1"
