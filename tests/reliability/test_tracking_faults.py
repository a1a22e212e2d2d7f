"""Tracking faults from issue 15 (items 2, 3, 7 and the MLflow half of 8), each against real MLflow stores
and, where the defect is process-level, real processes:

* a crafted mlflow_pending.jsonl is not replayed into a foreign store, nor made to upload files from
  outside output_dir; only the resumed run's own entries are (the user imports the rest on purpose);
* the default store is inside the run's own tree, and a store or lock someone else owns, or anyone may
  write, is refused before training;
* a misconfigured store (bad scheme, no scheme, unknown MLFLOW_RUN_ID, corrupt db, empty experiment,
  a store folder that cannot be created) fails as bad input: one line, exit 2, before training;
* a training SIGKILLed mid-run leaves its MLflow run RUNNING; the next training in that folder closes it
  as KILLED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, tiny_args
from infoprompt_ds.config import ConfigError
from infoprompt_ds.config_load import parse_config
from infoprompt_ds.tracking.client import RUN_MARKER, Tracker
from infoprompt_ds.tracking.outbox import LEFTOVER_FILE, PENDING_FILE, import_pending
from infoprompt_ds.tracking.store import check_tracking, default_store
from reliability_lib import record


def _client(db):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{db}")


def test_crafted_pending_file_is_not_replayed(tmp_path, monkeypatch, capsys):
    """Item 2: a pending file planted in an output folder names a foreign store and asks for /etc/passwd.
    A fresh training replays none of it (and never contacts that store); the resumed run's own entries
    are replayed; an explicit import still refuses artifacts from outside the folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, foreign = tmp_path / "run", tmp_path / "foreign"
    out.mkdir()
    foreign.mkdir()
    evil_uri = f"sqlite:///{foreign / 'mlflow.db'}"
    crafted = [{"op": "start", "run": "pending:evil", "experiment": "loot", "tags": {}, "time": 1, "uri": evil_uri},
               {"op": "artifact", "run": "pending:evil", "path": "/etc/passwd", "time": 2, "uri": evil_uri}]
    (out / PENDING_FILE).write_text("".join(json.dumps(e) + "\n" for e in crafted))

    tracker = Tracker(enabled=True)
    run_id = tracker.start("mine", str(out), "fresh", None, {})
    tracker.end("FINISHED")
    assert not (foreign / "mlflow.db").exists()  # the foreign store was never touched
    assert "not this run's" in capsys.readouterr().err
    assert not (out / PENDING_FILE).exists() and len((out / LEFTOVER_FILE).read_text().splitlines()) == 2
    own = _client(out / "mlflow.db")
    assert own.get_run(run_id).info.status == "FINISHED" and not own.list_artifacts(run_id)

    # A resume replays the entries of its own run, for its own store, with artifacts inside out/.
    (out / "note.txt").write_text("mine")
    store = default_store(out).uri
    mine = [{"op": "metrics", "run": run_id, "metrics": {"train/loss": 0.5}, "step": 7, "time": 3, "uri": store},
            {"op": "artifact", "run": run_id, "path": str(out / "note.txt"), "time": 4, "uri": store},
            {"op": "artifact", "run": run_id, "path": "/etc/passwd", "time": 5, "uri": store}]
    (out / PENDING_FILE).write_text("".join(json.dumps(e) + "\n" for e in mine))
    tracker = Tracker(enabled=True)
    tracker.start("mine", str(out), "fresh", run_id, {})
    tracker.end("FINISHED")
    assert [m.step for m in own.get_metric_history(run_id, "train/loss")] == [7]
    assert [a.path for a in own.list_artifacts(run_id)] == ["note.txt"]  # /etc/passwd: to the leftovers

    # The user's explicit import: sends to the store named in the file, but never a file from outside.
    sent, left = import_pending(str(out))
    assert left == 0 and (foreign / "mlflow.db").exists()
    loot = _client(foreign / "mlflow.db")
    runs = loot.search_runs([loot.get_experiment_by_name("loot").experiment_id])
    assert len(runs) == 1 and not loot.list_artifacts(runs[0].info.run_id)
    assert [a.path for a in own.list_artifacts(run_id)] == ["note.txt"]
    record("tracking_replay", tried=3, clean=3)


def test_default_store_is_inside_the_run_and_foreign_stores_are_refused(tmp_path, tiny_bert, sentiment_files,
                                                                      monkeypatch):
    """Item 3: `--output_dir /x/run` logs into /x/run/mlflow.db (not /x/mlflow.db); a store file, lock or
    folder owned by another user, or writable by anyone, is refused with a line naming the field."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert default_store(out).uri == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    cfg = parse_config(["--output_dir", str(out)])
    check_tracking(cfg)  # a folder that does not exist yet, under one of ours: fine
    out.mkdir()
    cases = 0
    for name, setup in (("world-writable store folder", lambda: os.chmod(out, 0o777)),
                        ("world-writable store", lambda: (out / "mlflow.db").touch(mode=0o666) or os.chmod(out / "mlflow.db", 0o666)),
                        ("store owned by someone else", lambda: (out / "mlflow.db").touch() or os.chown(out / "mlflow.db", 65534, 65534)),
                        ("lock owned by someone else", lambda: (out / "mlflow.db.init.lock").touch() or os.chown(out / "mlflow.db.init.lock", 65534, 65534))):
        for p in (out / "mlflow.db", out / "mlflow.db.init.lock"):
            p.unlink(missing_ok=True)
        os.chmod(out, 0o755)
        setup()
        with pytest.raises(ConfigError) as e:
            check_tracking(cfg)
        assert e.value.field == "output_dir", name
        assert "world-writable" in str(e.value) or "belongs to uid 65534" in str(e.value), name
        cases += 1
    # A sticky shared folder such as /tmp is fine as long as the store itself is ours.
    for p in (out / "mlflow.db", out / "mlflow.db.init.lock"):
        p.unlink(missing_ok=True)
    os.chmod(out, 0o1777)
    check_tracking(cfg)
    # The real CLI: exit 2 and one line, before any training output.
    os.chmod(out, 0o777)
    r = run_cli(tiny_args(tiny_bert, sentiment_files, out, max_steps=1), env={"MLFLOW_TRACKING_URI": ""}, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: output_dir: ") and "world-writable" in r.stderr
    assert not (out / "config.json").exists()
    record("tracking_store_ownership", tried=cases + 1, clean=cases + 1)


def test_corrupt_store_and_bad_settings_fail_before_training(tmp_path, tiny_bert, sentiment_files, monkeypatch):
    """Item 7: each permanent tracking error is bad input: one line naming the field, exit 2, before
    anything is trained (checked in process for each case, and through the real CLI for one)."""
    from infoprompt_ds.env import free_port
    from infoprompt_ds.tracking.store import LocalServer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "mlflow.db").write_bytes(b"this is not a database" * 100)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [  # (env, flags, field, words in the message)
        ({"MLFLOW_TRACKING_URI": "localhost:5000"}, {}, "MLFLOW_TRACKING_URI", "http://localhost:5000"),
        ({"MLFLOW_TRACKING_URI": "foo://bar"}, {}, "MLFLOW_TRACKING_URI", "scheme 'foo'"),
        ({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}, {}, "MLFLOW_TRACKING_URI", "does not answer"),
        ({"MLFLOW_RUN_ID": "0123456789abcdef0123456789abcdef"}, {}, "MLFLOW_RUN_ID", "is not in"),
        ({}, {"output_dir": str(corrupt)}, "output_dir", "not a usable MLflow store"),
        ({}, {"mlflow_experiment": ""}, "mlflow_experiment", "may not be empty"),
        ({}, {"output_dir": str(a_file / "run")}, "output_dir", "is not a folder"),
    ]
    for env, flags, field, words in cases:
        cfg = parse_config(["--output_dir", str(tmp_path / "ok"), *[x for k, v in flags.items() for x in (f"--{k}", v)]])
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(ConfigError) as e:
                check_tracking(cfg)
        assert e.value.field == field and words in str(e.value), (env, flags, str(e.value))
        assert "\n" not in str(e.value)
    # A reachable server with a known run passes.
    srv = LocalServer(tmp_path / "server").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        check_tracking(parse_config(["--output_dir", str(tmp_path / "ok")]))
    finally:
        srv.stop()
    # Through the real CLI: the corrupt store stops the run before training, with one line.
    out = corrupt
    r = run_cli(tiny_args(tiny_bert, sentiment_files, out, max_steps=2), env={"MLFLOW_TRACKING_URI": ""}, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: output_dir: ") and "[eval" not in r.stdout
    assert not (out / "config.json").exists()
    record("tracking_misconfiguration", tried=len(cases) + 1, clean=len(cases) + 1)


HOLD_RUN = """
import sys, time
from infoprompt_ds.tracking.client import Tracker
t = Tracker(enabled=True)
print(t.start("dead", sys.argv[1], "victim", None, {}), flush=True)
t.log_metrics({"train/loss": 1.0}, 1)
time.sleep(600)
"""


def test_sigkilled_run_is_closed_by_the_next_training(tmp_path, monkeypatch):
    """Item 8 (MLflow): a process that holds an open run is SIGKILLed; its run stays RUNNING (no code of
    its own runs). The next training in the same folder marks it KILLED and opens its own."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    victim = proc.stdout.readline().strip()
    deadline = time.monotonic() + 120
    while not (out / RUN_MARKER).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim and (out / RUN_MARKER).exists()
    client = MlflowClient(default_store(out).uri)
    assert client.get_run(victim).info.status == "RUNNING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    tracker = Tracker(enabled=True)
    tracker.start("dead", str(out), "next", None, {})
    # The marker is rewritten by the new run; the dead one's run is closed.
    assert json.loads((out / RUN_MARKER).read_text())["run_id"] == tracker.run_id
    tracker.end("FINISHED")
    assert client.get_run(victim).info.status == "KILLED"
    assert not (out / RUN_MARKER).exists()
    record("tracking_sigkill_run_closed", tried=1, clean=1)
