"""Tracking against a real `mlflow server` (sqlite store, local artifact root, 127.0.0.1) that the tests
start, kill and restart: outages at start and mid-run lose no metric, only rank 0 talks to MLflow, and a
resumed training continues its MLflow run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, tiny_args
from infoprompt_ds.env import free_port
from infoprompt_ds.tracking.client import Tracker
from infoprompt_ds.tracking.outbox import PENDING_FILE
from infoprompt_ds.tracking.store import LocalServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


def steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def import_cmd(path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infoprompt_ds.tracking", "import", str(path), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_unreachable_at_start_buffers_then_import(server, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    out = tmp_path / "run"
    tracker = Tracker(enabled=True)
    t0 = time.monotonic()
    assert tracker.start("offline", str(out), "offline-run", None, {"method": "prompt"}) is None
    tracker.log_params({"seed": 3, "nested": {"a": 1}})
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    (out / "metrics.json").write_text("{}")
    tracker.log_artifact(out / "metrics.json")
    tracker.end("FINISHED")
    assert time.monotonic() - t0 < 10  # no hang: a refused connection is not retried per call
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and f"infoprompt_ds.tracking import {out}" in err
    assert (out / PENDING_FILE).is_file()

    r = import_cmd(out, "--tracking_uri", server.uri)
    assert r.returncode == 0 and "imported 9 entries" in r.stdout, r.stdout + r.stderr
    assert not (out / PENDING_FILE).exists()
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("offline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "offline-run"
    assert run.data.params == {"seed": "3", "nested.a": "1"} and run.data.tags["method"] == "prompt"
    assert steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]
    assert import_cmd(out).returncode == 2  # nothing left to import: one-line error


def test_server_down_mid_run_then_back_flushes_in_order(server, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("INFOPROMPT_MLFLOW_RETRY_S", "0")  # retry on every call, to see the flush at once
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    out = tmp_path / "run"
    tracker = Tracker(enabled=True)
    run_id = tracker.start("flaky", str(out), "flaky-run", None, {}, system_metrics=True)
    assert run_id
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": float(step)}, step)
    server.stop()
    t0 = time.monotonic()
    for step in range(4, 8):
        tracker.log_metrics({"train/loss": float(step)}, step)
    assert time.monotonic() - t0 < 5 and tracker.pending >= 4
    assert (out / PENDING_FILE).is_file()  # a crash now would still keep them
    time.sleep(1.2)  # system metrics sampled while the server is away are buffered too
    server.start()
    tracker.log_metrics({"train/loss": 8.0}, 8)
    assert tracker.pending == 0 and not (out / PENDING_FILE).exists()
    tracker.end("FINISHED")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "reachable again" in err
    client = MlflowClient(server.uri)
    assert steps(client, run_id, "train/loss") == list(range(1, 9))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def _train(args, launcher, on_line=None):
    """Run the real CLI, calling on_line(line) for every stdout line as it comes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFOPROMPT_MLFLOW_RETRY_S": "1"}
    proc = subprocess.Popen(launcher + [str(ROOT / "train.py")] + args, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line:
            on_line(line)
    rc = proc.wait(timeout=600)
    reader.join(timeout=10)
    return rc, "".join(lines), "".join(err)


@pytest.mark.e2e
def test_two_ranks_server_killed_mid_run_then_resume_same_run(server, tiny_bert, sentiment_files, tmp_path,
                                                              monkeypatch):
    """2 ranks (deepspeed launcher, gloo on CPU): one run, each step logged once (rank 0 only); the server
    is killed mid-run, training finishes anyway, and the import brings every metric; then a resumed training
    continues the same MLflow run."""
    import json

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    out = tmp_path / "run"
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    args = tiny_args(tiny_bert, sentiment_files, out, max_steps=8, eval_steps=2, save_steps=4,
                     per_device_train_batch_size=4, mlflow_experiment="ranks")

    def kill_at_first_eval(line):
        if "[eval step 2]" in line and server.proc is not None:
            server.stop()

    rc, stdout, stderr = _train(args, launcher, kill_at_first_eval)
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    assert server.proc is None, "the server was not killed during the run"
    assert stderr.count("is unreachable") == 1, stderr[-3000:]
    assert (out / PENDING_FILE).is_file()
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    assert run_id  # the run was created before the outage

    server.start()
    r = import_cmd(out)
    assert r.returncode == 0, r.stdout + r.stderr
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("ranks")
    assert [x.info.run_id for x in client.search_runs([exp.experiment_id])] == [run_id]  # rank 1 opened none
    assert steps(client, run_id, "train/loss") == list(range(1, 9))  # no step lost, none twice
    assert steps(client, run_id, "eval/accuracy") == [0, 2, 4, 6, 8]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test/accuracy" in run.data.metrics
    assert run.data.params["world_size"] == "2"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"export", "metrics.json", "ds_config.json"}

    # Resume from the step-8 checkpoint with a longer schedule: the same MLflow run goes on.
    args = tiny_args(tiny_bert, sentiment_files, out, max_steps=10, eval_steps=2, save_steps=4,
                     per_device_train_batch_size=4, mlflow_experiment="ranks", resume_from_checkpoint="latest")
    rc, stdout, stderr = _train(args, launcher)
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["mlflow_run_id"] == run_id
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert steps(client, run_id, "train/loss") == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"




PARALLEL_RUN = """
import sys, time
from infoprompt_ds.tracking.client import Tracker
out, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # all processes touch the fresh store at the same moment
t = Tracker(enabled=True)
t.start("parallel", out, out.rsplit("/", 1)[-1], None, {})
for step in range(1, 4):
    t.log_metrics({"train/loss": 1.0 / step}, step)
t.end("FINISHED")
"""


def test_parallel_runs_on_a_fresh_sqlite_store_all_land(tmp_path):
    """Four runs start at once on a new sqlite store (a study or sweep with parallel jobs): the store's
    creation must not race (alembic migrations from two processes break the file for good)."""
    from mlflow import MlflowClient

    n, start_at = 4, time.time() + 8  # past the imports of every process
    # One fresh sqlite store shared by all four (as a sweep's store is shared by its trainings).
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL_RUN, str(tmp_path / f"run{i}"), str(start_at)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert not any("warning" in log for log in logs), logs  # nothing dropped, nothing buffered
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("parallel").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run{i}" for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(steps(client, r.info.run_id, "train/loss") == [1, 2, 3] for r in runs)


@pytest.mark.e2e
def test_training_run_is_complete_in_mlflow(server, tiny_bert, sentiment_files, tmp_path, monkeypatch):
    """One real training against the real server: the run carries the standard MLflow tags (source,
    user, git commit), a seed tag, package versions, a method-first name, the resolved value of every
    `auto` param, its three data splits as dataset inputs (digest + size), best_step and the best
    validation value as metrics, the best/ weights, and a pyfunc model that turns texts into labels."""
    import json

    import mlflow
    from mlflow import MlflowClient

    from conftest import run_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    out = tmp_path / "run"
    r = run_cli(tiny_args(tiny_bert, sentiment_files, out, max_steps=6, eval_steps=2, seed=3,
                          mlflow_experiment="complete", method="infoprompt"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    client = MlflowClient(server.uri)
    run = client.get_run(result["mlflow_run_id"])
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.run_name == "infoprompt-s3-full-tiny-train"  # method, seed, k first: visible when cut short
    for key in ("mlflow.source.name", "mlflow.source.git.commit", "mlflow.user", "mlflow.source.type"):
        assert tags.get(key), f"tag {key} missing: {sorted(tags)}"
    assert tags["mlflow.source.name"].endswith("train.py")
    assert tags["seed"] == "3" and tags["method"] == "infoprompt" and tags["task"] == "train"
    assert tags["version.torch"] and tags["version.mlflow"] == mlflow.__version__
    # Resolved values, not the config's `auto`/None.
    assert params["pooling"] == "cls" and params["task_type"] == "classification" and params["task"] == "train"
    assert params["metric_for_best_model"] == "accuracy" and params["warmup_steps"] == "1"  # ceil(0.06 * 6)
    assert params["labels"] == str(["neg", "pos"])
    # Data as dataset inputs: a digest and a size per split.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    assert json.loads(inputs["train"].profile)["num_rows"] == 64 and len(inputs["train"].digest) == 16
    assert len({d.digest for d in inputs.values()}) == 3
    # The weights behind the test metrics.
    assert metrics["best_step"] == result["best_step"]
    assert metrics["best_validation_accuracy"] == pytest.approx(result["best_validation_accuracy"])
    # The headline under best/ (first in the UI's alphabetical lists) and in the run's description.
    assert metrics["best/validation_accuracy"] == pytest.approx(result["best_validation_accuracy"])
    assert metrics["best/test_accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert metrics["best/step"] == result["best_step"] and sorted(metrics)[:3] == sorted(k for k in metrics if k.startswith("best/"))
    assert tags["mlflow.note.content"].startswith(f"test accuracy {result['test']['accuracy']:.4f}, validation accuracy")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"best", "export", "metrics.json"}
    best_files = {a.path for a in client.list_artifacts(run.info.run_id, "best")}
    assert "best/infoprompt.safetensors" in best_files
    # the export names the backbone as given and the local folder it resolved to (loadable offline)
    export_meta = json.loads((out / "best" / "infoprompt_config.json").read_text())
    assert export_meta["backbone"] == tiny_bert and export_meta["backbone_path"] == os.path.realpath(tiny_bert)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature is not None
    labels = model.predict(["a good great movie", "a bad awful film"])
    assert len(labels) == 2 and set(labels) <= {"neg", "pos"}
    from infoprompt_ds.predict import Predictor

    assert list(labels) == Predictor.load(str(out / "best")).predict(["a good great movie", "a bad awful film"])
