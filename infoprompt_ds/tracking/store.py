"""Where MLflow data goes, whether that store is usable, and opening it.

Default store (decided in one place, `default_store`): MLFLOW_TRACKING_URI if set, else a sqlite file
`mlflow.db` at the root of the tree that was asked for: `<output_dir>/mlflow.db` for a training,
`<output_root>/mlflow.db` for a sweep (whose trainings get that URI). Never a parent folder, where
someone else could plant a database. `check_tracking` refuses a bad store before training (exit 2).
`store_clients` opens stores safely from parallel processes; `LocalServer` is a local `mlflow server`
(tests, notebooks, the how-to in docs/tracking.md). See docs/tracking.md.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from infoprompt_ds.config import ConfigError, one_line
from infoprompt_ds.env import free_port

DB_NAME = "mlflow.db"
SWEEPS_ROOT = Path("outputs") / "sweeps"  # a sweep's default output_root is SWEEPS_ROOT/<name>


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
            store_clients()(uri).get_run(run_id)
        except Exception as e:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST or a malformed id
            raise ConfigError("MLFLOW_RUN_ID", f"run {run_id!r} is not in {uri}: {one_line(e)[:200]}; unset "
                              f"MLFLOW_RUN_ID to start a new run")


# --- opening a store ----------------------------------------------------------------------------------

def experiment_id(client, name: str, artifact_location: Optional[str]) -> str:
    """The id of experiment `name`: found (restored if it was deleted) or created; a run or sweep that
    created it at the same moment is not an error."""
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


def open_store(make_client, uri: str):
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


def store_clients():
    """A function uri -> MlflowClient that opens each store once (open_store) and keeps its client."""
    from mlflow import MlflowClient

    cache: dict[str, Any] = {}

    def get(uri: str):
        if uri not in cache:
            cache[uri] = open_store(MlflowClient, uri)
        return cache[uri]

    return get


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
