"""Run a grid of trainings (methods x seeds x k-shot x ...) as MLflow child runs of one parent run.

    python -m infoprompt_ds.compare.sweep --config sweeps/rt_64shot.yaml [--set max_steps=50] [--dry_run]

Each grid cell is one training, launched as a subprocess of the real CLI (`python train.py ...` or the
deepspeed launcher), so a crash of one run does not end the sweep. Each child run carries tags that
name its grid cell (`sweep.name`, `sweep.cell`, `sweep.args_hash`, `grid.<field>`); a sweep started again
skips the cells that already have a FINISHED run with the same arguments and redoes the rest (resuming
from the cell's checkpoint when one exists). The YAML format is documented in docs/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from infoprompt_ds.config import REPO_ROOT, ConfigError
from infoprompt_ds.errors import fail
from infoprompt_ds.tracking.run_metadata import ENV_PARENT, ENV_TAGS, PARENT_TAG
from infoprompt_ds.tracking.store import SWEEPS_ROOT, experiment_id
from infoprompt_ds.compare.sweep_spec import (EXIT_PREEMPTED, Cell, Outcome, SweepResult, SweepSpec, _cli_value, _parse_set,
                                              expand, load_spec, resolve_uri, to_argv)


# --- spec -----------------------------------------------------------------------------------------------


# --- MLflow side -----------------------------------------------------------------------------------------


def sweep_runs(client, exp_id: str, name: str, role: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`sweep.name` = '{name}' and tags.`sweep.role` = '{role}'",
                              max_results=5000)


def finished_cells(client, exp_id: str, name: str) -> dict[tuple[str, str], str]:
    """(cell id, args hash) -> run id of a FINISHED run of this sweep."""
    done = {}
    for run in sweep_runs(client, exp_id, name, "child"):
        if run.info.status == "FINISHED":
            done[(run.data.tags.get("sweep.cell"), run.data.tags.get("sweep.args_hash"))] = run.info.run_id
    return done


def _parent_run(client, exp_id: str, spec: SweepSpec) -> str:
    found = sweep_runs(client, exp_id, spec.name, "parent")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {"sweep.name": spec.name, "sweep.role": "parent", "sweep.grid": json.dumps(spec.grid)[:5000]}
    run = client.create_run(exp_id, tags=tags, run_name=spec.name)
    return run.info.run_id


def _cell_tags(spec: SweepSpec, cell: Cell) -> dict[str, str]:
    return {"sweep.name": spec.name, "sweep.role": "child", "sweep.cell": cell.cell_id,
            "sweep.group": cell.group_id, "sweep.args_hash": cell.args_hash,
            **{f"grid.{k}": _cli_value(v) for k, v in cell.values.items()}}


def _close_stale(client, exp_id: str, spec: SweepSpec, cell: Cell, status: str) -> None:
    """Runs of this cell left RUNNING (a killed training never ended its run) get a final status, so that
    `compare` lists them as failed instead of as still running."""
    for run in sweep_runs(client, exp_id, spec.name, "child"):
        if run.data.tags.get("sweep.cell") == cell.cell_id and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=status)


def _has_checkpoint(output_dir: Path) -> bool:
    from infoprompt_ds.runtime.checkpoint import complete_checkpoints, checkpoint_root

    return bool(complete_checkpoints(checkpoint_root(str(output_dir))))


# --- running --------------------------------------------------------------------------------------------

def launch(spec: SweepSpec, cell: Cell, uri: str, parent_id: str, run_id: Optional[str], resume: bool,
           log_path: Path) -> subprocess.Popen:
    args = dict(cell.args)
    if resume:
        args["resume_from_checkpoint"] = "latest"  # the checkpoint names the MLflow run to continue
    else:
        args["overwrite_output_dir"] = "true"  # a stale output of an attempt MLflow does not know as finished
    cmd = spec.launcher + [str(REPO_ROOT / "train.py")] + to_argv(args)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, ENV_PARENT: parent_id,
           ENV_TAGS: json.dumps(_cell_tags(spec, cell)), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, timeout: Optional[float]) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # graceful stop: checkpoint, exit 75, resumable by the next sweep
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def run_sweep(spec: SweepSpec, dry_run: bool = False, echo=print) -> SweepResult:
    """Every cell of the grid, one training at a time, as child runs of the sweep's parent run; cells with
    a FINISHED run of the same arguments are skipped, a cell with a checkpoint resumes it."""
    from mlflow import MlflowClient

    cells = expand(spec)
    uri, artifact_location = resolve_uri(spec)
    if dry_run:
        for cell in cells:
            echo(shlex.join(spec.launcher + [str(REPO_ROOT / "train.py")] + to_argv(cell.args)))
        return SweepResult(parent_run_id="")
    spec.output_root.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    try:
        exp_id = experiment_id(client, spec.experiment, artifact_location)
    except Exception as e:  # noqa: BLE001 - the sweep needs the store to know what is done
        raise ConfigError("tracking_uri", f"cannot reach MLflow at {uri}: {str(e).splitlines()[0][:200]}")
    parent_id = _parent_run(client, exp_id, spec)
    if spec.source and spec.source.is_file():
        client.log_artifact(parent_id, str(spec.source))
    done = finished_cells(client, exp_id, spec.name)
    result = SweepResult(parent_run_id=parent_id)
    echo(f"[sweep] {spec.name}: {len(cells)} runs in experiment {spec.experiment!r} at {uri} "
         f"(parent run {parent_id})")
    status = "FAILED"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's SIGTERM: stop like Ctrl-C
    try:
        for i, cell in enumerate(cells, 1):
            progress = f"{i}/{len(cells)}"
            key = (cell.cell_id, cell.args_hash)
            if key in done:
                result.outcomes.append(Outcome(cell, "SKIPPED", done[key],
                                               scores=_scores_of(Path(cell.args["output_dir"]))))
                echo(f"[sweep] {progress} skip {cell.cell_id} (finished: run {done[key]})")
                continue
            result.outcomes.append(_run_cell(client, exp_id, spec, cell, uri, parent_id, progress, echo))
        status = "FINISHED" if result.ok else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        _close_parent(client, parent_id, result, status)
    return result


def _run_cell(client, exp_id: str, spec: SweepSpec, cell: Cell, uri: str, parent_id: str, progress: str,
              echo) -> Outcome:
    """One training of the grid, to its end (or a stop: Ctrl-C/SIGTERM stops it gracefully, then raises)."""
    out = Path(cell.args["output_dir"])
    resume = _has_checkpoint(out)
    _close_stale(client, exp_id, spec, cell, "KILLED" if resume else "FAILED")
    run_id = None
    if not resume:
        # Created here, not by the training, so that a run that crashes before it reaches MLflow
        # (bad data, out of memory) still shows up as a FAILED run of its cell.
        tags = {**_cell_tags(spec, cell), PARENT_TAG: parent_id}
        run_id = client.create_run(exp_id, tags=tags, run_name=cell.args["run_name"]).info.run_id
    echo(f"[sweep] {progress} run  {cell.cell_id}" + (" (resuming its checkpoint)" if resume else "")
         + f"; log: {out / 'train.log'}")
    t0 = time.monotonic()
    proc = launch(spec, cell, uri, parent_id, run_id, resume, out / "train.log")
    try:
        rc = _wait(proc, spec.run_timeout_s)
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # lets the training save a checkpoint the next sweep resumes
            _wait(proc, 120)
        raise
    seconds = time.monotonic() - t0
    run_id = _run_id_of(out) or run_id
    scores = _scores_of(out)
    state = "FINISHED" if rc == 0 else "KILLED" if rc in (EXIT_PREEMPTED, -signal.SIGINT, -signal.SIGTERM) \
        else "FAILED"
    if state != "FINISHED":
        _close_stale(client, exp_id, spec, cell, state)
    echo(f"[sweep] {progress} {state.lower()} {cell.cell_id} in {seconds:.0f}s (exit {rc}, run {run_id})")
    return Outcome(cell, state, run_id, seconds, rc, scores)


def _close_parent(client, parent_id: str, result: SweepResult, status: str) -> None:
    """The parent run ends with the sweep's status and how many runs finished, were skipped, failed, killed."""
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("FINISHED", "SKIPPED", "FAILED", "KILLED")}
    try:
        client.log_batch(parent_id, metrics=[_metric(f"sweep/runs_{k.lower()}", v) for k, v in counts.items()])
        client.set_terminated(parent_id, status=status)
    except Exception as e:  # noqa: BLE001 - the children's results are in MLflow already
        print(f"warning: could not close the parent run {parent_id}: {e}", file=sys.stderr)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _run_id_of(output_dir: Path) -> Optional[str]:
    try:
        return json.loads((output_dir / "metrics.json").read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def _scores_of(output_dir: Path) -> dict[str, float]:
    """{"best val <metric>": x, "test <metric>": y} from a finished run's metrics.json ({} otherwise)."""
    try:
        m = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {f"best val {k.removeprefix('best_validation_')}": v for k, v in m.items()
           if k.startswith("best_validation_") and isinstance(v, (int, float))}
    key = next(iter(out), "").removeprefix("best val ")
    if key and isinstance(m.get("test"), dict) and key in m["test"]:
        out[f"test {key}"] = m["test"][key]
    return out


def compare_command(spec: SweepSpec) -> str:
    """The exact command that compares this sweep's runs: by name when output_root is the default
    (outputs/sweeps/<name>, relative to where the sweep ran), else by folder."""
    in_folder = resolve_uri(spec)[0] == f"sqlite:///{spec.output_root / 'mlflow.db'}"
    default_root = spec.output_root == (SWEEPS_ROOT / spec.name).resolve()
    cmd = ["python", "-m", "infoprompt_ds.compare", "--sweep",
           str(spec.output_root) if in_folder and not default_root else spec.name]
    if spec.tracking_uri and spec.tracking_uri != os.environ.get("MLFLOW_TRACKING_URI"):
        cmd += ["--tracking_uri", spec.tracking_uri]  # a server named in the sweep file
    return shlex.join(cmd)


def summary(result: SweepResult, spec: Optional[SweepSpec] = None) -> str:
    """The end-of-sweep table (status, time, scores, run name, cell) and what to run next."""
    keys = list(dict.fromkeys(k for o in result.outcomes for k in o.scores))
    lines = [f"{'status':9} {'seconds':>7}  " + "".join(f"{k:>18}" for k in keys) + f"  {'run name':34} cell"]
    for o in result.outcomes:
        scores = "".join(f"{o.scores[k]:18.4f}" if k in o.scores else f"{'-':>18}" for k in keys)
        lines.append(f"{o.status:9} {o.seconds:7.0f}  {scores}  {o.cell.args.get('run_name', '-'):34} {o.cell.cell_id}")
    if spec is not None:
        uri, _ = resolve_uri(spec)
        lines += ["", f"compare: {compare_command(spec)}"]
        if uri.startswith("sqlite:///"):
            lines.append(f"UI:      mlflow ui --backend-store-uri {uri}   (then open the link compare prints)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infoprompt_ds.compare.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (see sweeps/ and docs/tracking.md)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a base training field for every run (repeatable)")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default: the file's, then "
                        "MLFLOW_TRACKING_URI, then sqlite in output_root)")
    parser.add_argument("--output_root", default=None, help="where each run's output_dir goes")
    parser.add_argument("--dry_run", action="store_true", help="print the training commands and exit")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.config, _parse_set(args.set), args.tracking_uri, args.output_root)
        result = run_sweep(spec, dry_run=args.dry_run)
    except ConfigError as e:
        fail(e)
    if args.dry_run:
        return
    print(summary(result, spec))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
