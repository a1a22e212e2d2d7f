"""MLflow tracking, on rank 0 only (other ranks get a tracker whose calls do nothing).

Default store (decided in one place, `default_store`): MLFLOW_TRACKING_URI if set, else a sqlite file
`mlflow.db` at the root of the tree that was asked for: `<output_dir>/mlflow.db` for a training,
`<output_root>/mlflow.db` for a sweep (whose trainings get that URI). Never a parent folder, where
someone else could plant a database. `check_tracking` refuses a bad store before training. See
docs/tracking.md.

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
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from .config import ConfigError, one_line

from .env import free_port
from .io import write_text_atomic

PENDING_FILE = "mlflow_pending.jsonl"
LEFTOVER_FILE = "mlflow_pending.leftover.jsonl"  # entries a later run did not replay (not its own)
PARENT_TAG = "mlflow.parentRunId"
ENV_PARENT = "INFOPROMPT_MLFLOW_PARENT_RUN_ID"
ENV_TAGS = "INFOPROMPT_MLFLOW_TAGS"
ENV_RETRY = "INFOPROMPT_MLFLOW_RETRY_S"
ENV_SYSTEM = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
_LOCAL_REF = "pending:"  # run reference of a run not yet created on the server


DB_NAME = "mlflow.db"
SWEEPS_ROOT = Path("outputs") / "sweeps"  # a sweep's default output_root is SWEEPS_ROOT/<name>
RUN_MARKER = "mlflow_run.json"  # the MLflow run a training in this folder has open (see close_dead_run)


@dataclass(frozen=True)
class Store:
    uri: str
    artifact_location: Optional[str]  # for a new experiment; None: the server's own default
    field: str  # what the user changes to move it: MLFLOW_TRACKING_URI, output_dir or output_root


def default_store(root: str | Path) -> Store:
    """THE rule for where MLflow data goes, for every entry point (train, sweep, compare, import).

    MLFLOW_TRACKING_URI wins. Otherwise a sqlite store at `root`, the top of the tree the user asked
    for: a training's output_dir, a sweep's output_root. Not its parent: `--output_dir /tmp/run` used to
    log into /tmp/mlflow.db, a file any user of the machine could have created first (and with it, where
    the artifacts go). A sweep's trainings receive the sweep's URI, so a sweep and `compare --sweep NAME`
    meet in `<output_root>/mlflow.db` with no flags."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Store(uri, None, "MLFLOW_TRACKING_URI")
    root = Path(root).expanduser().resolve()
    return Store(f"sqlite:///{root / DB_NAME}", (root / "mlartifacts").as_uri(), "output_dir")


def non_identity_fields() -> set[str]:
    """Config fields that do not change what a run computes (where it writes, how often it logs, system
    metrics, caches): marked `"identity": False` in TrainConfig's field metadata. They never split a
    comparison group (compare) nor make a finished sweep cell new (sweep)."""
    from dataclasses import fields

    from .config import TrainConfig

    return {f.name for f in fields(TrainConfig) if f.metadata.get("identity", True) is False}


def default_tracking_uri(output_dir: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment) of a training: see default_store."""
    store = default_store(output_dir)
    return store.uri, store.artifact_location


def sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


# --- pre-flight: a bad store is bad input (exit 2 before training), not something to buffer -----------

_SCHEMES = ("", "http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


def _check_owned(path: Path, field: str) -> None:
    """Refuse a store file, lock or folder that another user owns or anyone may write: whoever can write
    it decides what the run logs into and where its artifacts go."""
    st = path.stat()
    if st.st_uid != os.geteuid() and st.st_uid != 0:
        raise ConfigError(field, f"{path} belongs to uid {st.st_uid}, not you; refusing to track into a store "
                          f"another user controls (set MLFLOW_TRACKING_URI or choose another folder)")
    sticky_dir = path.is_dir() and st.st_mode & 0o1000
    if st.st_mode & 0o002 and not sticky_dir:
        raise ConfigError(field, f"{path} is world-writable; anyone could replace the MLflow store "
                          f"(chmod o-w {path}, or set MLFLOW_TRACKING_URI)")


def check_sqlite_store(db: Path, field: str) -> None:
    """The store's folder is writable (or creatable) and ours; an existing file is ours and a database."""
    import sqlite3

    folder = db.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"cannot create the MLflow store {db}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, f"the MLflow store folder {existing} is not writable; choose another "
                          f"{field} or set MLFLOW_TRACKING_URI")
    if existing == folder:
        _check_owned(folder, field)
    for p in (db, db.with_name(db.name + ".init.lock")):
        if p.exists() or p.is_symlink():
            if p.is_symlink() or not p.is_file():
                raise ConfigError(field, f"{p} is not a regular file; refusing to use it as the MLflow store")
            _check_owned(p, field)
    if db.is_file() and db.stat().st_size:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
                tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        except sqlite3.DatabaseError as e:
            raise ConfigError(field, f"{db} is not a usable MLflow store ({e}); move it away or set "
                              f"MLFLOW_TRACKING_URI")
        if tables and "alembic_version" not in tables:
            raise ConfigError(field, f"{db} is an SQLite file but not an MLflow store; move it away")


def check_tracking(cfg) -> None:
    """What would make tracking fail for good, checked in the pre-flight in well under a second (a
    server gets one /health request): an empty experiment name, a URI MLflow cannot use, a corrupt or
    foreign sqlite file, an unwritable or someone else's store folder, an MLFLOW_RUN_ID the store does
    not know, a server that does not answer. Only a store that was reachable and goes away later is
    buffered (the outbox). Rank 0 only: the other ranks never talk to MLflow."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    if not str(cfg.mlflow_experiment).strip():
        raise ConfigError("mlflow_experiment", "may not be empty; name the MLflow experiment, e.g. --mlflow_experiment rt")
    store = default_store(cfg.output_dir)
    uri, field = store.uri, store.field
    scheme = urlparse(uri).scheme.lower()
    if scheme not in _SCHEMES:
        hint = f"http://{uri}" if re.fullmatch(r"[\w.-]+:\d+/?", uri) else "http://host:5000 or sqlite:////abs/mlflow.db"
        raise ConfigError(field, f"{uri!r} is not a tracking URI MLflow can use (scheme {scheme or 'missing'!r}); "
                          f"did you mean {hint}?")
    db = sqlite_path(uri)
    if scheme == "sqlite":
        if db is None or not db.is_absolute():
            raise ConfigError(field, f"{uri!r}: write an absolute sqlite path, sqlite:////abs/path/mlflow.db")
        check_sqlite_store(db, field)
    elif scheme in ("http", "https"):
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                ok = r.status == 200
        except OSError as e:
            raise ConfigError(field, f"the MLflow server {uri} does not answer ({e}); start it, or unset "
                              f"MLFLOW_TRACKING_URI to log into {DB_NAME} in output_dir")
        if not ok:
            raise ConfigError(field, f"the MLflow server {uri} answered /health with {r.status}")
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        try:
            _clients()(uri).get_run(run_id)
        except Exception as e:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST or a malformed id
            raise ConfigError("MLFLOW_RUN_ID", f"run {run_id!r} is not in {uri}: {one_line(e)[:200]}; unset "
                              f"MLFLOW_RUN_ID to start a new run")


# --- what every run carries ---------------------------------------------------------------------------

_TASK_SHORT = {"rotten_tomatoes": "rt", "semeval2010_task8": "semeval", "wnut_tweets": "wnut"}
VERSIONED = ("torch", "deepspeed", "transformers", "datasets", "peft", "mlflow", "infoprompt-ds")


def task_name(cfg) -> str:
    """What the run was trained on, as a person names it: the preset, the dataset, or the train file."""
    if cfg.task:
        return cfg.task
    if cfg.train_file:
        return Path(cfg.train_file).stem
    return str(cfg.dataset)


def run_name_for(cfg) -> str:
    """Method first, so runs read apart in the UI: infoprompt-minilm-rt-k64-s0 (an explicit run_name wins)."""
    if cfg.run_name:
        return cfg.run_name
    words = [w for w in re.split(r"[-_/.]+", Path(str(cfg.model_name_or_path)).name.lower()) if w]
    backbone = next((w for w in words if w not in ("all", "sentence", "transformers")), "model")
    task = task_name(cfg).split("/")[-1]
    task = _TASK_SHORT.get(task, task)
    k = f"k{cfg.k_shot}" if cfg.k_shot else "full"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.method}-{backbone}-{task}-{k}-s{cfg.seed}")


def run_tags(cfg) -> dict[str, str]:
    """The run's own tags (the standard mlflow.* ones come from MLflow's context providers in start)."""
    return {"method": cfg.method, "backbone": str(cfg.model_name_or_path), "task": task_name(cfg),
            "seed": str(cfg.seed), "k_shot": str(cfg.k_shot)}


def standard_tags() -> dict[str, str]:
    """mlflow.user, mlflow.source.name/type, mlflow.source.git.commit (MLflow's own context providers, as
    mlflow.start_run sets them) and the versions of the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    tags: dict[str, str] = {}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags.update(resolve_tags({}))
    except Exception as e:  # noqa: BLE001 - a context provider failing must not stop the training
        print(f"warning: MLflow run context tags unavailable: {one_line(e)}", file=sys.stderr, flush=True)
    if tags.get("mlflow.source.name") in (None, "", "-"):
        tags["mlflow.source.name"] = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0] else "python"
    tags.setdefault("mlflow.source.type", "LOCAL")
    if "mlflow.source.git.commit" not in tags:
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    for pkg in VERSIONED:
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    tags["version.python"] = sys.version.split()[0]
    return tags


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dataset_entity(name: str, split, source: str) -> dict[str, str]:
    """An MLflow dataset (the UI's Datasets column) for a tokenized split: the digest hashes the token ids
    and labels actually trained on, so two runs on different k-shot samples show different digests."""
    import hashlib

    h = hashlib.sha256()
    for col in ("input_ids", "labels"):
        if col in split.column_names:
            h.update(json.dumps(list(split[col])).encode())
    profile = {"num_rows": len(split)}
    schema = {"mlflow_colspec": [{"name": c, "type": "string"} for c in split.column_names]}
    return {"name": name, "digest": h.hexdigest()[:16], "source_type": "local",
            "source": json.dumps({"uri": source}), "schema": json.dumps(schema), "profile": json.dumps(profile)}


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


def inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def apply_entry(client, entry: dict[str, Any], root: Optional[Path] = None) -> Optional[str]:
    """Send one outbox entry. Returns the new run id for a 'start' of a run not yet created.
    Artifacts are sent only from inside `root` (the run's output_dir): a pending file is data from disk,
    and a crafted one must not make a training upload /etc/passwd."""
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
    elif op in ("artifact", "model") and (root is None or not inside(entry["path"], root)):
        raise PermissionError(f"{op} {entry['path']} is outside {root}; not sent")
    elif op == "artifact":
        path = Path(entry["path"])
        if path.is_dir():
            client.log_artifacts(run, str(path), entry.get("artifact_path"))
        elif path.is_file():
            client.log_artifact(run, str(path), entry.get("artifact_path"))
        else:
            raise FileNotFoundError(f"artifact {path} no longer exists")
    elif op == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        client.log_inputs(run, [DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])])
                                for d in entry["datasets"]])
    elif op == "model":
        log_predictor_model(client.tracking_uri, run, entry["path"], entry["backbone"], entry["task_type"])
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

    def send(self, client_for, on_created=None, warn=None, root: Optional[Path] = None) -> bool:
        """Send entries in order until one fails for lack of a server. True when the outbox is empty.

        An entry the store rejects for good (bad value, missing artifact) is dropped with a warning:
        retrying it forever would block every entry behind it."""
        while self.entries:
            entry = self.entries[0]
            try:
                new_id = apply_entry(client_for(entry["uri"]), entry, root)
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
        self._out: Optional[Path] = None
        self._params: set[str] = set()  # keys logged: MLflow params are write-once, the first value wins

    # The interface train_loop.py uses: start, log_resolved, log_params, log_metrics, log_artifact,
    # log_best, end.
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
        self._out = Path(output_dir).resolve()
        self._out.mkdir(parents=True, exist_ok=True)
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        close_dead_run(self._out, self.uri, run_id, self._client_for)
        self._outbox = Outbox(self._out / PENDING_FILE)
        self._outbox.entries = own_pending(self._out, self.uri, run_id)  # this run's backlog: sent first
        if self._outbox.entries:
            self._outage = True  # keep appending to the file until the backlog is through
        all_tags = {**standard_tags(), **tags, **env_tags()}
        parent_run_id = parent_run_id or os.environ.get(ENV_PARENT)
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        self._ref = run_id or f"{_LOCAL_REF}{uuid.uuid4().hex}"
        self.run_id = run_id
        all_tags["mlflow.runName"] = run_name if not run_id else all_tags.get("mlflow.runName", run_name)
        self._submit({"op": "start", "run": self._ref, "experiment": experiment,
                      "artifact_location": artifact_location, "run_name": run_name, "tags": all_tags},
                     force=True)
        if self.run_id:
            self._mark_open()
        if system_metrics if system_metrics is not None else _env_flag(ENV_SYSTEM):
            self._sampler = _SystemSampler(self)
            self._sampler.start()
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Params not logged yet (resolved values from log_resolved come first and win over `auto`)."""
        if self.enabled:
            new = {k: v for k, v in flatten(params).items() if k not in self._params}
            self._params.update(new)
            if new:
                self._submit({"op": "params", "params": new})

    def log_resolved(self, cfg, data, pooling: str, ds_config: dict[str, Any]) -> None:
        """What the run actually used where the config says `auto`/None (pooling, task, task type, metric,
        warmup steps, labels), logged before the config itself; and the train/validation/test splits as
        MLflow dataset inputs with a digest of their token ids and their size."""
        if not self.enabled:
            return
        sched = (ds_config.get("scheduler") or {}).get("params") or {}
        resolved = {"pooling": pooling, "task": task_name(cfg), "task_type": data.task.type,
                    "metric_for_best_model": data.task.metric, "labels": list(data.label_names),
                    "label_words": data.task.label_words, "text_column": data.task.text_column,
                    "text_pair_column": data.task.text_pair_column, "label_column": data.task.label_column,
                    "no_relation_label": data.task.no_relation_label,
                    "warmup_steps": sched.get("warmup_num_steps", cfg.warmup_steps),
                    "deepspeed": cfg.deepspeed or "ds_configs/zero3.json"}
        self.log_params(resolved)
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        datasets = []
        for split in ("train", "validation", "test"):
            if split in data.splits:
                source = str(Path(files[split]).resolve()) if files[split] else f"{cfg.dataset}:{split}"
                name = f"{task_name(cfg).split('/')[-1]}-{split}"
                datasets.append({"context": split, "dataset": dataset_entity(name, data.splits[split], source)})
        self._submit({"op": "inputs", "datasets": datasets})

    def log_best(self, output_dir: str | Path, result: dict[str, Any], backbone: str, task_type: str) -> None:
        """The weights behind the reported test metrics: `best/` (or `export/` when the last step was
        tested), as files and as a pyfunc model that predicts labels from texts; best_step and the best
        validation value as metrics."""
        if not self.enabled:
            return
        out = Path(output_dir)
        best = {k: float(v) for k, v in result.items() if (k == "best_step" or k.startswith("best_validation_"))
                and v is not None}
        if best:
            self.log_metrics(best, int(result.get("global_step") or 0))
        weights = out / ("best" if result.get("test_weights") == "best" and (out / "best").is_dir() else "export")
        if weights.name == "best":
            self.log_artifact(weights, "best")
        path = Path(backbone)
        self._submit({"op": "model", "path": str(weights.resolve()), "task_type": task_type,
                      "backbone": str(path.resolve()) if path.exists() else backbone})

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
        if self._out is not None:
            (self._out / RUN_MARKER).unlink(missing_ok=True)
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
            if self._outbox.send(self._client_for, self._created, self._warn, self._out):
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
            self._mark_open()

    def _mark_open(self) -> None:
        """<output_dir>/mlflow_run.json names the run this process has open, so that a later training in
        the folder can close it as KILLED if this process dies without ending it (SIGKILL, OOM)."""
        if self._out is not None and self.run_id:
            marker = {"run_id": self.run_id, "uri": self.uri, "pid": os.getpid(), "host": socket.gethostname()}
            tmp = self._out / f".{RUN_MARKER}.tmp{os.getpid()}"
            tmp.write_text(json.dumps(marker), encoding="utf-8")
            os.replace(tmp, self._out / RUN_MARKER)

    def _warn(self, message: str, once: bool = False) -> None:
        if once and self._warned:
            return
        self._warned = self._warned or once
        print(f"warning: {message}", file=sys.stderr, flush=True)


def close_dead_run(out: Path, uri: str, resuming: Optional[str], client_for) -> Optional[str]:
    """A training in `out` that died without ending its MLflow run (SIGKILL, OOM, power) left it RUNNING
    forever; its marker names it. Close it as KILLED, unless it is the run being resumed now (which
    reopens it), lives in another store, or its process is still alive on this host."""
    try:
        marker = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
        run_id, pid, host = str(marker["run_id"]), int(marker["pid"]), marker["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if marker.get("uri") != uri or run_id == resuming:
        return None
    if host == socket.gethostname() and pid != os.getpid():
        try:
            os.kill(pid, 0)
            return None  # still running: not ours to close
        except ProcessLookupError:
            pass
        except PermissionError:
            return None
    try:
        client = client_for(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            print(f"[mlflow] run {run_id} of an earlier training in {out} died without ending; marked KILLED",
                  file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - an old run we cannot close must not stop this one
        print(f"warning: could not close the earlier MLflow run {run_id}: {one_line(e)[:200]}",
              file=sys.stderr, flush=True)
        return None
    (out / RUN_MARKER).unlink(missing_ok=True)
    return run_id


def own_pending(out: Path, uri: str, run_id: Optional[str]) -> list[dict[str, Any]]:
    """The entries of `<out>/mlflow_pending.jsonl` this training may send on its own: those of the run it
    continues, for the store it logs into, with artifacts inside `out`. Anything else (another run, a
    store named in the file, a path outside, an unparsable line) is moved to mlflow_pending.leftover.jsonl
    and left for the user: `python -m infoprompt_ds.tracking import <out>` sends it when asked."""
    path = out / PENDING_FILE
    if not path.is_file():
        return []
    own, other = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            mine = (run_id is not None and e.get("run") == run_id and e.get("uri") == uri
                    and (e.get("op") not in ("artifact", "model") or inside(e["path"], out)))
        except (ValueError, AttributeError, KeyError, TypeError, OSError):
            e, mine = line, False
        (own if mine else other).append(e)
    if other:
        with open(out / LEFTOVER_FILE, "a", encoding="utf-8") as f:
            f.writelines((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in other)
        print(f"warning: {len(other)} pending MLflow entries in {path} are not this run's (another run or "
              f"store); not sent. Moved to {out / LEFTOVER_FILE}; send them, if you trust them, with: "
              f"python -m infoprompt_ds.tracking import {out / LEFTOVER_FILE}", file=sys.stderr, flush=True)
    path.unlink()
    return own


# --- the logged model: texts in, labels out (the class is in mlflow_model.py) ---------------------------

def log_predictor_model(uri: str, run_id: str, export_dir: str, backbone: str, task_type: str) -> None:
    import mlflow
    from importlib.metadata import version
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = None if task_type == "ner" else Schema([ColSpec("string")])  # one label per text
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=outputs)  # a list of texts
    # Explicit requirements: inferring them would import-trace the model in a subprocess (slow).
    reqs = [f"{p}=={version(p)}" for p in ("torch", "transformers", "mlflow", "safetensors")] + ["infoprompt-ds"]
    mlflow.set_tracking_uri(uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise RuntimeError("another MLflow run is active in this process")
    from .mlflow_model import PredictorModel

    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pyfunc.log_model(name="model", python_model=PredictorModel(), artifacts={"export": export_dir},
                                model_config={"backbone": backbone}, signature=signature, pip_requirements=reqs)


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
    """Send a pending file (or an output_dir's pending and leftover files) to MLflow: the user's explicit
    way to replay entries a training did not send. Artifacts are sent only from inside the folder that
    holds the file. Returns (sent, still pending)."""
    p = Path(path)
    files = [p / PENDING_FILE, p / LEFTOVER_FILE] if p.is_dir() else [p]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError("path", f"no pending MLflow entries at {p} (nothing to import)")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    sent = left = 0
    for f in files:
        box = Outbox(f)
        try:
            box.load()
        except ValueError as e:
            raise ConfigError("path", f"{f} is not a pending-entries file: {e}")
        if tracking_uri:
            for e in box.entries:
                e["uri"] = tracking_uri
        total = len(box.entries)
        stores = sorted({str(e.get("uri")) for e in box.entries})
        print(f"sending {total} entries from {f} to {', '.join(stores)}", file=sys.stderr)
        box.send(_clients(), warn=lambda m: print(f"warning: {m}", file=sys.stderr), root=f.parent.resolve())
        box.save()
        sent, left = sent + total - len(box.entries), left + len(box.entries)
    return sent, left


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
