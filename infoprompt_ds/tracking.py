"""MLflow tracking, on rank 0 only (other ranks get a tracker whose calls do nothing).

Default store: a sqlite file `mlflow.db` beside output_dir (in its parent), artifacts in `mlartifacts/`
there; MLFLOW_TRACKING_URI (e.g. http://127.0.0.1:5000) selects a server instead. See docs/tracking.md.

Fault tolerance: every MLflow call goes through an outbox. A call that fails because the store cannot
be reached (connection refused, timeout, 5xx) never raises into the training loop: the tracker warns
once, keeps the entry (and every later one) in order in memory and in `<output_dir>/mlflow_pending.jsonl`,
retries at most every INFOPROMPT_MLFLOW_RETRY_S seconds (default 30), and sends the backlog, with the
original timestamps and steps, as soon as the server answers again. Whatever is still pending when
training ends stays in that file; `python -m infoprompt_ds.tracking import <output_dir>` sends it.

Hooks for launchers (the sweep uses them; they work through the plain CLI):
  MLFLOW_RUN_ID                  log into this existing run (MLflow's own variable)
  INFOPROMPT_MLFLOW_PARENT_RUN_ID  make the run a child of this run (nested runs in the UI)
  INFOPROMPT_MLFLOW_TAGS         JSON object of extra tags for the run
  MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true  log system/* (CPU, memory, GPU) metrics
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from .env import free_port
from .io import write_text_atomic

PENDING_FILE = "mlflow_pending.jsonl"
PARENT_TAG = "mlflow.parentRunId"
ENV_PARENT = "INFOPROMPT_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "INFOPROMPT_MLFLOW_TAGS"
ENV_RETRY = "INFOPROMPT_MLFLOW_RETRY_S"
ENV_SYSTEM = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
_LOCAL_REF = "pending:"  # run reference of a run not yet created on the server


def default_tracking_uri(output_dir: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    parent = Path(output_dir).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}", (parent / "mlartifacts").as_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.endswith("label_words"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's param value limit
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def env_tags() -> dict[str, str]:
    """Extra run tags a launcher passed through the environment (INFOPROMPT_MLFLOW_TAGS, ..._PARENT_RUN_ID)."""
    tags: dict[str, str] = {}
    raw = os.environ.get(ENV_TAGS)
    if raw:
        try:
            tags.update({str(k): str(v) for k, v in json.loads(raw).items()})
        except (ValueError, AttributeError):
            print(f"warning: {ENV_TAGS} is not a JSON object; ignored", file=sys.stderr, flush=True)
    if os.environ.get(ENV_PARENT):
        tags[PARENT_TAG] = os.environ[ENV_PARENT]
    return tags


def is_unreachable(e: BaseException) -> bool:
    """True for failures that mean 'the store is not answering now' (worth a retry), not 'bad request'."""
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(e)
    # MLflow's REST client wraps connection errors, timeouts and exhausted 5xx retries in this form.
    if text.startswith("API request to") and ("failed with" in text or "exceeded" in text):
        return True
    code = getattr(e, "error_code", None)
    if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    return "database is locked" in text  # a busy local sqlite store


# --- applying outbox entries -----------------------------------------------------------------------

def _experiment_id(client, name: str, artifact_location: Optional[str]) -> str:
    import mlflow

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # created meanwhile by a concurrent run
        if exp is None:
            raise
        return exp.experiment_id


def apply_entry(client, entry: dict[str, Any]) -> Optional[str]:
    """Send one outbox entry. Returns the new run id for a 'start' of a run not yet created."""
    from mlflow.entities import Metric, Param, RunTag

    op, run = entry["op"], entry["run"]
    if op == "start":
        tags = entry.get("tags") or {}
        if run.startswith(_LOCAL_REF):
            exp_id = _experiment_id(client, entry["experiment"], entry.get("artifact_location"))
            created = client.create_run(exp_id, start_time=entry["time"], tags=tags, run_name=entry.get("run_name"))
            return created.info.run_id
        client.update_run(run, status="RUNNING")  # a resumed training continues its run
        if tags:
            client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return None
    if run.startswith(_LOCAL_REF):
        raise RuntimeError(f"entry for run {run} precedes the run's creation")
    if op == "params":
        items = list(entry["params"].items())
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            client.log_batch(run, params=[Param(k, v) for k, v in items[i:i + 100]])
    elif op == "metrics":
        client.log_batch(run, metrics=[Metric(k, float(v), entry["time"], entry["step"])
                                       for k, v in entry["metrics"].items()])
    elif op == "tags":
        client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in entry["tags"].items()])
    elif op == "artifact":
        path = Path(entry["path"])
        if path.is_dir():
            client.log_artifacts(run, str(path), entry.get("artifact_path"))
        elif path.is_file():
            client.log_artifact(run, str(path), entry.get("artifact_path"))
        else:
            raise FileNotFoundError(f"artifact {path} no longer exists")
    elif op == "end":
        client.set_terminated(run, status=entry["status"], end_time=entry["time"])
    else:
        raise ValueError(f"unknown outbox op {op!r}")
    return None


class Outbox:
    """Ordered entries not yet accepted by the tracking store, mirrored to a jsonl file while not empty."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self.dropped = 0

    def load(self) -> None:
        if self.path and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.entries = [json.loads(x) for x in lines if x.strip()] + self.entries

    def append(self, entry: dict[str, Any], persist: bool) -> None:
        self.entries.append(entry)
        if persist and self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def save(self) -> None:
        """Rewrite the file to hold exactly the pending entries (deleted when there are none)."""
        if not self.path:
            return
        if not self.entries:
            self.path.unlink(missing_ok=True)
            return
        write_text_atomic(self.path, "".join(json.dumps(e) + "\n" for e in self.entries))

    def send(self, client_for, on_created=None, warn=None) -> bool:
        """Send entries in order until one fails for lack of a server. True when the outbox is empty.

        An entry the store rejects for good (bad value, missing artifact) is dropped with a warning:
        retrying it forever would block every entry behind it."""
        while self.entries:
            entry = self.entries[0]
            try:
                new_id = apply_entry(client_for(entry["uri"]), entry)
            except Exception as e:  # noqa: BLE001 - classified just below
                if is_unreachable(e):
                    return False
                self.dropped += 1
                if warn:
                    warn(f"MLflow rejected a {entry['op']} entry, dropped: {str(e).splitlines()[0][:300]}")
                new_id = None
                if entry["op"] == "start" and entry["run"].startswith(_LOCAL_REF):
                    # Nothing can be logged to a run that could not be created: drop its entries too.
                    self.entries = [x for x in self.entries if x["run"] != entry["run"]]
                    continue
            self.entries.pop(0)
            if new_id:
                for x in self.entries:
                    if x["run"] == entry["run"]:
                        x["run"] = new_id
                if on_created:
                    on_created(entry["run"], new_id)
        return True


def _open_store(make_client, uri: str):
    """A client whose store is ready. A new sqlite store is created by alembic migrations, which are not
    safe to run from two processes at once (parallel runs, or sweep workers, starting together on a fresh
    `mlflow.db`): the loser fails with "table _alembic_tmp_... already exists" and the half-migrated file
    stays broken for every later run. So the first touch of a sqlite store is serialised on a lock file
    beside it (fcntl: one host; a store on a shared filesystem across nodes wants an MLflow server)."""
    if not uri.startswith("sqlite:///"):
        return make_client(uri)
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # MlflowClient() may build the store itself; the search makes sure it has
            client = make_client(uri)
            client.search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def _clients():
    from mlflow import MlflowClient

    cache: dict[str, Any] = {}

    def get(uri: str):
        if uri not in cache:
            cache[uri] = _open_store(MlflowClient, uri)
        return cache[uri]

    return get


# --- the tracker the training loop uses --------------------------------------------------------------

class Tracker:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: Optional[str] = None  # the MLflow run id, once the run exists on the server
        self.uri: Optional[str] = None
        self._ref: Optional[str] = None  # run_id, or a local placeholder until the run is created
        self._outbox = Outbox(None)
        self._client_for = None
        self._lock = threading.Lock()  # the system-metrics thread logs too
        self._outage = False
        self._warned = False
        self._last_try = 0.0
        self._retry_s = float(os.environ.get(ENV_RETRY, 30))
        self._wait_s = self._retry_s  # grows while the outage lasts: a hung server costs a timeout per try
        self._sampler: Optional[_SystemSampler] = None

    # The interface train_loop.py uses: start, log_params, log_metrics, log_artifact, end.
    def start(self, experiment: str, output_dir: str, run_name: str, run_id: Optional[str],
              tags: dict[str, str], parent_run_id: Optional[str] = None,
              system_metrics: Optional[bool] = None) -> Optional[str]:
        """Open a new run, or reopen `run_id` (a resumed training continues its MLflow run).

        Never raises for an unreachable store: the run is then created as soon as the store answers
        (or by the import command), and everything logged until then waits in the outbox."""
        if not self.enabled:
            return None
        # A down server must cost seconds, not MLflow's default of minutes of retries per call:
        # retrying is the outbox's job.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, artifact_location = default_tracking_uri(output_dir)
        self._client_for = _clients()
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._outbox = Outbox(Path(output_dir) / PENDING_FILE)
        self._outbox.load()  # left over from an earlier attempt in this output_dir: sent first
        if self._outbox.entries:
            self._outage = True  # keep appending to the file until the backlog is through
        all_tags = {**tags, **env_tags()}
        parent_run_id = parent_run_id or os.environ.get(ENV_PARENT)
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        self._ref = run_id or f"{_LOCAL_REF}{uuid.uuid4().hex}"
        self.run_id = run_id
        if not run_id:
            all_tags.setdefault("mlflow.runName", run_name)
        self._submit({"op": "start", "run": self._ref, "experiment": experiment,
                      "artifact_location": artifact_location, "run_name": run_name, "tags": all_tags},
                     force=True)
        if system_metrics if system_metrics is not None else _env_flag(ENV_SYSTEM):
            self._sampler = _SystemSampler(self)
            self._sampler.start()
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._submit({"op": "params", "params": flatten(params)})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            self._submit({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step)})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self._ref):
            return
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._submit({"op": "end", "status": status}, force=True)
        with self._lock:
            if self._outbox.entries:
                self._outbox.save()
                print(f"warning: MLflow ({self.uri}) still unreachable; {len(self._outbox.entries)} tracking "
                      f"entries kept in {self._outbox.path}; send them later with: python -m "
                      f"infoprompt_ds.tracking import {self._outbox.path.parent}", file=sys.stderr, flush=True)
        self._ref = None
        self.run_id = None

    @property
    def pending(self) -> int:
        return len(self._outbox.entries)

    # --- outbox plumbing ---
    def _submit(self, entry: dict[str, Any], force: bool = False) -> None:
        entry = {"run": self._ref, **entry, "time": _now_ms(), "uri": self.uri}
        with self._lock:
            self._outbox.append(entry, persist=self._outage)
            now = time.monotonic()
            if self._outage and not force and now - self._last_try < self._wait_s:
                return  # the store was down moments ago: do not stall training on every step
            self._last_try = now
            backlog = len(self._outbox.entries)
            if self._outbox.send(self._client_for, self._created, self._warn):
                self._wait_s = self._retry_s
                if self._outage:
                    self._outage = False
                    self._outbox.save()  # all sent: removes the file
                    if backlog > 1:
                        print(f"[mlflow] tracking store reachable again: sent {backlog} buffered entries",
                              file=sys.stderr, flush=True)
            elif self._outage:
                self._wait_s = min(2 * self._wait_s, max(self._retry_s, 300.0))  # up to 5 min between tries
                if len(self._outbox.entries) < backlog:
                    self._outbox.save()  # part went through: the file must not send it (or create the run) twice
            else:
                self._outage = True
                self._outbox.save()
                self._warn(f"MLflow tracking store {self.uri} is unreachable; training continues and tracking "
                           f"entries are buffered in {self._outbox.path} (sent when it is back, or with "
                           f"`python -m infoprompt_ds.tracking import {self._outbox.path.parent}`)", once=True)

    def _created(self, ref: str, run_id: str) -> None:
        if ref == self._ref:
            self._ref = self.run_id = run_id

    def _warn(self, message: str, once: bool = False) -> None:
        if once and self._warned:
            return
        self._warned = self._warned or once
        print(f"warning: {message}", file=sys.stderr, flush=True)


class _SystemSampler:
    """system/* metrics (CPU, memory, disk, network, GPU) from MLflow's own monitors, logged through the
    tracker so that they are buffered like every other metric while the server is away (MLflow's own
    monitor thread stops for good at the first failed call)."""

    def __init__(self, tracker: Tracker):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.tracker = tracker
        self.monitor = SystemMetricsMonitor(run_id="unused", tracking_uri=tracker.uri)  # sampling only
        self.interval = float(self.monitor.sampling_interval)
        self.every = int(self.monitor.samples_before_logging)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="infoprompt-system-metrics")
        self._step = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for _ in range(self.every):
                try:
                    self.monitor.collect_metrics()
                except Exception:  # noqa: BLE001 - a sensor failing must not end the training
                    pass
                if self._stop.wait(self.interval):
                    break
            try:
                values = self.monitor.aggregate_metrics()
                for m in self.monitor.monitors:
                    m.clear_metrics()
            except Exception:  # noqa: BLE001
                continue
            if values:
                self.tracker.log_metrics({f"system/{k}": v for k, v in values.items()}, self._step)
                self._step += 1


# --- a local tracking server (tests, notebooks, the how-to in docs/tracking.md) ------------------------

class LocalServer:
    """`mlflow server` with a sqlite backend store and a local artifact root, bound to 127.0.0.1.

    stop() kills the whole process group (the server forks uvicorn workers); start() again reuses the same
    port and store, which is how the tests take the server away mid-run and bring it back."""

    def __init__(self, root: str | Path, port: Optional[int] = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.root.resolve() / 'mlflow.db'}",
                "--default-artifact-root", str(self.root.resolve() / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def start(self, timeout: float = 120) -> "LocalServer":
        import subprocess
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {self.root / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout}s; see {self.root / 'server.log'}")

    def stop(self) -> None:
        import signal

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: kills uvicorn and the job runner too
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None


# --- import command -----------------------------------------------------------------------------------

def import_pending(path: str, tracking_uri: Optional[str] = None) -> tuple[int, int]:
    """Send a pending file (or an output_dir's) to MLflow. Returns (sent, still pending)."""
    from .config import ConfigError

    p = Path(path)
    if p.is_dir():
        p = p / PENDING_FILE
    if not p.is_file():
        raise ConfigError("path", f"no pending MLflow entries at {p} (nothing to import)")
    box = Outbox(p)
    try:
        box.load()
    except ValueError as e:
        raise ConfigError("path", f"{p} is not a pending-entries file: {e}")
    if tracking_uri:
        for e in box.entries:
            e["uri"] = tracking_uri
    total = len(box.entries)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    box.send(_clients(), warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    box.save()
    return total - len(box.entries), len(box.entries)


def main(argv: Optional[list[str]] = None) -> None:
    from .config import ConfigError
    from .errors import fail

    parser = argparse.ArgumentParser(prog="python -m infoprompt_ds.tracking",
                                     description="Tracking utilities (see docs/tracking.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help=f"send the entries a training could not send ({PENDING_FILE}) to MLflow")
    imp.add_argument("path", help=f"an output_dir, or a {PENDING_FILE} file")
    imp.add_argument("--tracking_uri", default=None,
                     help="send to this store instead of the one recorded with each entry")
    args = parser.parse_args(argv)
    try:
        sent, left = import_pending(args.path, args.tracking_uri)
    except ConfigError as e:
        fail(e)
    if left:
        fail(f"sent {sent} entries; {left} still pending (tracking store unreachable); run again later", 1)
    print(f"imported {sent} entries")


if __name__ == "__main__":
    main()
