"""Numerics (a run that really diverges) and safe loading (tampered pickles, tampered exports, where the
documented MLflow server binds).

Divergence is produced for real, without any test hook: learning_rate=1e30 in fp32. The warmup's first
step has lr 0, the next updates move the weights by ~1e30, and within a few steps the loss is NaN."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli, tiny_args
from reliability_lib import record, stderr_lines

pytestmark = pytest.mark.reliability

MAX_NONFINITE = 3


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, tiny_bert, sentiment_files):
    out = tmp_path_factory.mktemp("numerics") / "run"
    args = tiny_args(tiny_bert, sentiment_files, out, learning_rate=1e30, max_steps=40, save_steps=1,
                     eval_steps=1000, max_nonfinite_steps=MAX_NONFINITE, mlflow_experiment="rel-numerics")
    proc = run_cli(args, timeout=900)
    return out, args, proc


def test_nonfinite_loss_is_skipped_counted_and_stops_the_run(diverged):
    out, _, proc = diverged
    from infoprompt_ds.runtime.checkpoint import MARKER, resolve_checkpoint

    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in stderr_lines(proc.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged:"), errors
    assert "Traceback" not in proc.stderr
    skipped = [line for line in stderr_lines(proc.stdout + proc.stderr) if line.startswith("[nonfinite]")]
    assert len(skipped) == MAX_NONFINITE, skipped  # each skipped and counted, then the stop
    # the last good checkpoint is kept, complete, finite, and named in the message
    latest = resolve_checkpoint("latest", str(out))
    assert str(latest) in errors[0]
    step = json.loads((latest / MARKER).read_text())["global_step"]
    for f in latest.glob("*model_states.pt"):
        state = torch.load(f, weights_only=True)["module"]
        assert state and all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), f
    assert not (out / "metrics.json").exists() and not (out / "export").exists()  # nothing looks finished
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rel-numerics").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["train/nonfinite_steps"] == MAX_NONFINITE
    record("nonfinite", injected=1, survived=1, nonfinite_steps_skipped=MAX_NONFINITE, stopped_after_step=step,
           exit_code=proc.returncode)


class _Payload:
    """Unpickling this runs `touch <sentinel>`: what a tampered checkpoint could do."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_tampered_checkpoint_is_refused_and_its_payload_never_runs(diverged, tmp_path):
    out, args, _ = diverged
    from infoprompt_ds.runtime.checkpoint import load_checkpoint, resolve_checkpoint, verify_checkpoint_files
    from infoprompt_ds.config import ConfigError

    tampered = tmp_path / "run"
    shutil.copytree(out, tampered)
    latest = resolve_checkpoint("latest", str(tampered))
    verify_checkpoint_files(latest)  # the genuine files pass with weights_only=True
    sentinel = tmp_path / "PAYLOAD_RAN"
    cases = 0
    # 1. through the real command: a torch.save'd payload in place of the model states
    model_states = next(latest.glob("*model_states.pt"))
    torch.save({"module": _Payload(sentinel)}, model_states)
    new_args = [a if a != str(out) else str(tampered) for a in args] + ["--resume_from_checkpoint", "latest",
                                                                         "--max_steps", "60"]
    proc = run_cli(new_args, timeout=600)
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: resume_from_checkpoint: refusing to load"), lines
    assert model_states.name in lines[0]
    assert not sentinel.exists()
    cases += 1
    # 2. in process: a raw pickle (not torch's zip format) as the optimizer states, through the function
    #    that hands checkpoints to DeepSpeed (it refuses before DeepSpeed is touched: engine=None)
    shutil.copy(next(out.glob("checkpoints/step*/*model_states.pt")), model_states)
    optim = next(latest.glob("*optim_states.pt"))
    optim.write_bytes(pickle.dumps({"optimizer_state_dict": _Payload(sentinel)}))
    with pytest.raises(ConfigError, match=re.escape(optim.name)):
        load_checkpoint(None, latest)
    assert not sentinel.exists()
    cases += 1
    # 3. an extra pickle dropped into the folder
    optim.unlink()
    shutil.copy(next(out.glob("checkpoints/step*/*optim_states.pt")), optim)
    (latest / "extra.pkl").write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(ConfigError, match="extra.pkl"):
        verify_checkpoint_files(latest)
    assert not sentinel.exists()
    cases += 1
    record("tampered_pickle", injected=cases, survived=cases)


def test_exports_load_with_safetensors_and_refuse_anything_else(tmp_path):
    from infoprompt_ds.runtime.checkpoint import EXPORT_WEIGHTS, load_export, save_export
    from infoprompt_ds.config import ConfigError

    save_export(tmp_path / "e", {"prompt.weight": torch.randn(2, 4)}, {"backbone": "x"})
    assert load_export(tmp_path / "e")[0]["prompt.weight"].shape == (2, 4)
    sentinel = tmp_path / "PAYLOAD_RAN"
    torch.save({"prompt.weight": _Payload(sentinel)}, tmp_path / "e" / EXPORT_WEIGHTS)
    with pytest.raises(ConfigError, match="export"):
        load_export(tmp_path / "e")
    assert not sentinel.exists()
    record("tampered_export", injected=1, survived=1)


def _mlflow_commands(text: str) -> list[str]:
    """`mlflow server|ui ...` commands in a document, with their continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return re.findall(r"mlflow (?:server|ui)\b[^\n`]*", text)


# A host other than 127.0.0.1 is allowed only where a document explicitly opts in for a reason stated
# beside it (a cluster whose compute nodes must reach a server on the login node).
OPT_IN = {"docs/slurm.md": "compute nodes"}


def test_documented_mlflow_servers_bind_to_localhost():
    from infoprompt_ds.tracking.store import LocalServer

    cmd = LocalServer("/nonexistent").command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    help_text = subprocess.run([sys.executable, "-m", "mlflow", "server", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "default: 127.0.0.1" in help_text  # a command without --host binds to localhost
    checked, opted_in = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        rel = str(doc.relative_to(ROOT))
        if rel == "docs/reliability.md":  # generated from this test's own findings (it quotes them)
            continue
        text = doc.read_text()
        for command in _mlflow_commands(text):
            host = re.search(r"(?:--host|-h)[ =](\S+)", command)
            checked += 1
            if host and host.group(1) not in ("127.0.0.1", "localhost"):
                assert rel in OPT_IN and OPT_IN[rel] in text, (rel, command)
                opted_in.append(f"{rel}: {command.strip()}")
    assert checked >= 2
    record("mlflow_bind", commands_checked=checked, explicit_non_local=opted_in)
