"""MLflow tracking of a training, on rank 0 only (other ranks get a tracker whose calls do nothing).

    Tracker.start -> log_resolved / log_params / log_metrics / log_artifact / log_best -> end

Fault tolerance: every MLflow call goes through an outbox (tracking_outbox.py). A call that fails because
the store cannot be reached (connection refused, timeout, 5xx) never raises into the training loop: the
tracker warns once, keeps the entry (and every later one) in order in memory and in
`<output_dir>/mlflow_pending.jsonl`, retries at most every INFOPROMPT_MLFLOW_RETRY_S seconds (default 30),
and sends the backlog, with the original timestamps and steps, as soon as the server answers again.
Whatever is still pending when training ends stays in that file; `python -m infoprompt_ds.tracking import
<output_dir>` (this module's `main`) sends it.

Where the store is and the pre-flight check of it: tracking_store.py. What a run is named and carries
(tags, resolved params, datasets; the launcher hooks MLFLOW_RUN_ID, INFOPROMPT_MLFLOW_PARENT_RUN_ID,
INFOPROMPT_MLFLOW_TAGS): run_metadata.py. MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true logs system/* (CPU,
memory, GPU) metrics. See docs/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import ConfigError, one_line
from infoprompt_ds.errors import fail
from infoprompt_ds.tracking.run_metadata import (ENV_PARENT, PARENT_TAG, best_metrics, dataset_inputs, env_tags, flatten, resolved_params, standard_tags, summary_metrics, summary_note, tested_weights)
from infoprompt_ds.tracking.outbox import LOCAL_REF, PENDING_FILE, Outbox, import_pending, own_pending
from infoprompt_ds.tracking.store import default_tracking_uri, store_clients

ENV_RETRY = "INFOPROMPT_MLFLOW_RETRY_S"
ENV_SYSTEM = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
RUN_MARKER = "mlflow_run.json"  # the MLflow run a training in this folder has open (see close_dead_run)
# Tagged on the run at creation: the marker is a file anyone who can write the folder may forge, the tag is
# on the server; close_dead_run ends only a run whose tag names this folder (issue 34 item 2).
FOLDER_TAG = "infoprompt.output_dir"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


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
        self._client_for = store_clients()
        self._out = Path(output_dir).resolve()
        self._out.mkdir(parents=True, exist_ok=True)
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        close_dead_run(self._out, self.uri, run_id, self._client_for)
        self._outbox = Outbox(self._out / PENDING_FILE)
        self._outbox.entries = own_pending(self._out, self.uri, run_id)  # this run's backlog: sent first
        if self._outbox.entries:
            self._outage = True  # keep appending to the file until the backlog is through
        all_tags = {**standard_tags(), **tags, **env_tags(), FOLDER_TAG: str(self._out)}
        parent_run_id = parent_run_id or os.environ.get(ENV_PARENT)
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        self._ref = run_id or f"{LOCAL_REF}{uuid.uuid4().hex}"
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
        """What the run actually used where the config says `auto`/None (run_metadata.resolved_params),
        logged before the config itself; and the train/validation/test splits as MLflow dataset inputs
        with a digest of their token ids and their size."""
        if not self.enabled:
            return
        self.log_params(resolved_params(cfg, data, pooling, ds_config))
        self._submit({"op": "inputs", "datasets": dataset_inputs(cfg, data)})

    def log_best(self, output_dir: str | Path, result: dict[str, Any], backbone: str, task_type: str) -> None:
        """The weights behind the reported test metrics: `best/` (or `export/` when the last step was
        tested), as files and as a pyfunc model that predicts labels from texts; best_step and the best
        validation value as metrics."""
        if not self.enabled:
            return
        best = {**best_metrics(result), **summary_metrics(result)}  # best/*: the headline, first in the UI
        if best:
            self.log_metrics(best, int(result.get("global_step") or 0))
            self.set_tags({"mlflow.note.content": summary_note(result)})
        weights = tested_weights(output_dir, result)
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
    reopens it), lives in another store, its process is still alive on this host, or a training in
    another folder (or no training of ours) created it: the marker may be forged, the run's tag is not."""
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
        run = client.get_run(run_id)
        if run.data.tags.get(FOLDER_TAG) != str(out):
            print(f"warning: {out / RUN_MARKER} names MLflow run {run_id}, which no training in {out} started; "
                  f"left as it is (the marker is ignored)", file=sys.stderr, flush=True)
            (out / RUN_MARKER).unlink(missing_ok=True)
            return None
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            print(f"[mlflow] run {run_id} of an earlier training in {out} died without ending; marked KILLED",
                  file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - an old run we cannot close must not stop this one
        print(f"warning: could not close the earlier MLflow run {run_id}: {one_line(e)[:200]}",
              file=sys.stderr, flush=True)
        return None
    (out / RUN_MARKER).unlink(missing_ok=True)
    return run_id


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


# --- import command -----------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
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
