"""Sweep + compare end to end against a real `mlflow server` (sqlite store, local artifact root, 127.0.0.1)
that the test starts and kills: a 2-seed x 2-method grid on a tiny BERT, compare's table and plots read
back from MLflow, and a rerun that skips the finished runs and redoes only the interrupted one."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, tiny_args
from infoprompt_ds.tracking.store import LocalServer

EXPERIMENT = "sweep-e2e"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


def run_module(module: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def write_sweep(path, model, files, out_root, uri) -> str:
    flags = tiny_args(model, files, out_root / "unused", max_steps=6, eval_steps=2, logging_steps=1)
    base = {k.lstrip("-"): v for k, v in zip(flags[::2], flags[1::2])}
    for key in ("output_dir", "mlflow_experiment"):
        base.pop(key)
    spec = {"name": "tiny", "experiment": EXPERIMENT, "output_root": str(out_root), "tracking_uri": uri,
            "launcher": "python", "base": base, "grid": {"method": ["infoprompt", "prompt"], "seed": [1, 2]}}
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def children(client, status=None):
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.role` = 'child'")
    return [r for r in runs if status is None or r.info.status == status]


def test_bad_sweep_file_fails_in_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"grid": {"method": ["infoprompt", "nope"]}}))
    r = run_module("infoprompt_ds.compare.sweep", ["--config", str(cfg), "--dry_run"], timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: method: must be one of infoprompt, prompt") and line.endswith("got 'nope'")


def test_sweep_compare_and_rerun(server, tiny_bert, sentiment_files, tmp_path):
    from matplotlib.image import imread
    from mlflow import MlflowClient

    cfg = write_sweep(tmp_path / "sweep.yaml", tiny_bert, sentiment_files, tmp_path / "runs", server.uri)
    r = run_module("infoprompt_ds.compare.sweep", ["--config", cfg])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # The end-of-sweep table shows each run's scores and method-first name, then the exact next command.
    rows = [line for line in r.stdout.splitlines() if line.startswith("FINISHED")]
    assert len(rows) == 4 and all(len(re.findall(r"\b[01]\.\d{4}\b", line)) == 2 for line in rows), r.stdout
    assert "best val accuracy" in r.stdout and "test accuracy" in r.stdout
    assert any("infoprompt-s1-full-tiny-train" in line for line in rows)
    printed = r.stdout.split("compare: ", 1)[1].splitlines()[0]
    assert printed == f"python -m infoprompt_ds.compare --sweep tiny --tracking_uri {server.uri}"

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`sweep.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    runs = children(client)
    assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs)
    cells = {(x.data.tags["grid.method"], x.data.tags["grid.seed"]) for x in runs}
    assert cells == {(m, s) for m in ("infoprompt", "prompt") for s in ("1", "2")}
    for x in runs:
        assert x.data.tags["mlflow.parentRunId"] == parent_id  # nested under the sweep in the UI
        assert x.data.params["method"] == x.data.tags["grid.method"]
        assert x.data.params["label_words"] and "label_words.pos" not in x.data.params  # flat, stable names
        # Logged with their steps, so MLflow's compare view overlays the curves.
        assert [m.step for m in client.get_metric_history(x.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
        assert [m.step for m in client.get_metric_history(x.info.run_id, "eval/accuracy")] == [0, 2, 4, 6]
        assert "test/accuracy" in x.data.metrics
        # method, seed, k first in the UI (the grid's seed is visible when the name is cut short)
        assert x.info.run_name.startswith(f"{x.data.tags['grid.method']}-s{x.data.tags['grid.seed']}-")
        assert x.data.tags["seed"] == x.data.tags["grid.seed"] and x.data.tags.get("mlflow.source.git.commit")

    # An interrupted cell: killed before its first checkpoint, its run never finished. The rerun skips the
    # other three and redoes this one from scratch, as a new run (a cell with a checkpoint would resume it).
    victim = next(x for x in runs if x.data.tags["grid.method"] == "prompt" and x.data.tags["grid.seed"] == "2")
    client.set_terminated(victim.info.run_id, status="FAILED")
    shutil.rmtree(tmp_path / "runs" / "method=prompt__seed=2" / "checkpoints")
    r = run_module("infoprompt_ds.compare.sweep", ["--config", cfg])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(" skip ") == 3 and r.stdout.count(" run  ") == 1, r.stdout
    assert "run  method=prompt,seed=2" in r.stdout
    assert len(children(client, "FINISHED")) == 4 and len(children(client)) == 5

    out = tmp_path / "compare"
    t0 = time.monotonic()  # the command the sweep printed, as printed (+ where to write, and the target)
    r = run_module("infoprompt_ds.compare", shlex.split(printed)[3:] + ["--output_dir", str(out), "--target", "0.5"])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    print(f"[timing] end of sweep -> rendered comparison (2 methods x 2 seeds): {time.monotonic() - t0:.1f} s")
    table = [line for line in r.stdout.splitlines() if line.startswith("| infoprompt") or line.startswith("| prompt")]
    assert len(table) == 2 and all("±" in line and "| 2 |" in line for line in table), r.stdout
    assert "infoprompt vs prompt: test accuracy difference" in r.stdout and "over 2 paired seeds" in r.stdout
    assert victim.info.run_id in r.stdout.split("## Not included")[1]  # the failed run is listed, not averaged

    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"val_accuracy.png", "losses__all.png"}
    assert {p.name for p in out.glob("*.svg")} == {"val_accuracy.svg", "losses__all.svg"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(p).ndim == 3
    comparisons = client.search_runs([exp.experiment_id], filter_string="tags.`infoprompt.role` = 'comparison'")
    assert len(comparisons) == 1
    logged = {a.path for a in client.list_artifacts(comparisons[0].info.run_id)}
    assert {"comparison.csv", "comparison.md", "significance.csv", "plots"} <= logged
    plots = {a.path for a in client.list_artifacts(comparisons[0].info.run_id, "plots")}
    assert plots == {"plots/val_accuracy.png", "plots/losses__all.png", "plots/val_accuracy.svg",
                     "plots/losses__all.svg"}
