"""The outbox: MLflow calls as ordered entries, kept until the store accepts them.

Every call the tracker makes becomes an entry ({"op": start|params|metrics|tags|artifact|inputs|model|end,
"run", "uri", "time", ...}). A call that fails because the store cannot be reached (connection refused,
timeout, 5xx: `is_unreachable`) leaves its entry, and every later one, in order in memory and in
`<output_dir>/mlflow_pending.jsonl`; they are sent, with their original timestamps and steps, as soon as
the store answers again. A run not yet created on the store is referred to as `pending:<uuid>` until its
`start` entry goes through. What a training could not send stays in that file;
`python -m infoprompt_ds.tracking import <output_dir>` sends it (`import_pending`). See docs/tracking.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import ConfigError
from infoprompt_ds.io import write_text_atomic
from infoprompt_ds.tracking.store import experiment_id, store_clients

PENDING_FILE = "mlflow_pending.jsonl"
LEFTOVER_FILE = "mlflow_pending.leftover.jsonl"  # entries a later run did not replay (not its own)
LOCAL_REF = "pending:"  # run reference of a run not yet created on the server


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
        if run.startswith(LOCAL_REF):
            exp_id = experiment_id(client, entry["experiment"], entry.get("artifact_location"))
            created = client.create_run(exp_id, start_time=entry["time"], tags=tags, run_name=entry.get("run_name"))
            return created.info.run_id
        client.update_run(run, status="RUNNING")  # a resumed training continues its run
        if tags:
            client.log_batch(run, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return None
    if run.startswith(LOCAL_REF):
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
        from infoprompt_ds.tracking.mlflow_model import log_predictor_model  # here: importing the outbox must not import mlflow.pyfunc

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
                if entry["op"] == "start" and entry["run"].startswith(LOCAL_REF):
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
        box.send(store_clients(), warn=lambda m: print(f"warning: {m}", file=sys.stderr), root=f.parent.resolve())
        box.save()
        sent, left = sent + total - len(box.entries), left + len(box.entries)
    return sent, left
