"""compare's numbers on runs with known values, logged to a real `mlflow server` with MlflowClient (the
same shape of runs the training logs): grouping by all but the seed, mean ± std, steps and seconds to
target, the paired test, plots, artifacts, and failed/running runs listed instead of averaged in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from infoprompt_ds.compare.cli import Options, compare
from infoprompt_ds.tracking.store import LocalServer


EXPERIMENT = "synthetic"


# test accuracy per (k_shot, method) over seeds 0, 1, 2
TEST_ACC = {("64", "infoprompt"): [0.80, 0.82, 0.84], ("64", "prompt"): [0.70, 0.73, 0.74],
            ("256", "infoprompt"): [0.85, 0.80, 0.90], ("256", "prompt"): [0.86, 0.81, 0.88]}


T0 = 1_700_000_000_000  # ms


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


def log_run(client, exp_id, k_shot, method, seed, test_acc, status="FINISHED"):
    from mlflow.entities import Metric, Param

    mi = method == "infoprompt"
    run = client.create_run(exp_id, start_time=T0, run_name=f"{method}-k{k_shot}-s{seed}",
                            tags={"method": method})
    rid = run.info.run_id
    params = {"method": method, "seed": seed, "k_shot": k_shot, "gamma": 0.1 if mi else 0.0,
              "beta": 0.2 if mi else 0.0, "kl_weight": 0.1 if mi else 0.0, "trainable_params": 900 if mi else 300,
              "learning_rate": 0.01, "metric_for_best_model": "accuracy", "output_dir": f"/o/{rid}",
              "run_name": f"{method}-k{k_shot}-s{seed}", "task": "rotten_tomatoes",
              # Fields marked "identity": False in TrainConfig: they differ here, yet must not split groups.
              "system_metrics": seed == 1, "logging_steps": 5 + seed, "unprompted_cache_dir": f"/c/{seed}"}
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    best = test_acc + 0.01
    metrics = [Metric("eval/accuracy", v, T0 + step * 1000, step) for step, v in ((10, 0.6), (20, best), (30, best - 0.02))]
    metrics += [Metric("test/accuracy", test_acc, T0 + 31_000, 30)]
    for step in range(5, 31, 5):
        metrics += [Metric("train/loss", 1.0 / step + seed * 0.01, T0 + step * 1000, step),
                    Metric("train/ce", 0.8 / step, T0 + step * 1000, step),
                    Metric("train/samples_per_s", 100.0 if mi else 120.0, T0 + step * 1000, step)]
        if mi:
            metrics += [Metric(f"train/{k}", 0.1 / step, T0 + step * 1000, step) for k in ("head", "repr", "kl")]
    client.log_batch(rid, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(rid, status=status, end_time=T0 + 40_000)
    return rid


@pytest.fixture(scope="module")
def logged(server):
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp_id = client.create_experiment(EXPERIMENT)
    ids = {}
    for (k, m), accs in TEST_ACC.items():
        for seed, acc in enumerate(accs):
            ids[(k, m, seed)] = log_run(client, exp_id, k, m, seed, acc)
    ids["failed"] = log_run(client, exp_id, "64", "infoprompt", 3, 0.99, status="FAILED")
    ids["running"] = log_run(client, exp_id, "64", "prompt", 3, 0.10, status="RUNNING")
    client.create_run(exp_id, tags={"sweep.role": "parent", "sweep.name": "x"}, run_name="x")  # not a training
    return ids


def test_compare_table_significance_plots_artifacts(server, logged, tmp_path):
    from matplotlib.image import imread
    from mlflow import MlflowClient

    printed = []
    res = compare(Options(experiment=EXPERIMENT, tracking_uri=server.uri, target=0.75, output_dir=tmp_path),
                  echo=printed.append)
    t = res.table.set_index(["method", "k_shot"])
    assert list(res.table.columns[:3]) == ["method", "k_shot", "seeds"]  # only what varies is shown
    assert len(t) == 4 and set(t["seeds"]) == {3}
    row = t.loc[("infoprompt", "64")]
    assert row["test_accuracy_mean"] == pytest.approx(0.82) and row["test_accuracy_std"] == pytest.approx(0.02)
    assert row["best_val_accuracy_mean"] == pytest.approx(0.83)
    assert row["steps_to_target_mean"] == 20 and row["reached_target"] == 3
    assert row["seconds_to_target_mean"] == pytest.approx(20.0)
    assert row["samples_per_s_mean"] == pytest.approx(100.0)
    assert t.loc[("prompt", "64")]["reached_target"] == 1  # only seed 2 (0.75) reaches 0.75
    assert logged["failed"] not in row["run_ids"] and logged["running"] not in t.loc[("prompt", "64")]["run_ids"]

    sig = res.significance.set_index("k_shot")
    assert sig.loc["64", "method_a"] == "infoprompt" and sig.loc["64", "method_b"] == "prompt"
    assert sig.loc["64", "test_accuracy_paired_seeds"] == 3
    assert sig.loc["64", "test_accuracy_mean_diff"] == pytest.approx(0.0967, abs=1e-3)
    assert bool(sig.loc["64", "test_accuracy_significant"]) is True
    assert bool(sig.loc["256", "test_accuracy_significant"]) is False

    excluded = dict(zip(res.excluded["run_id"], res.excluded["status"]))
    assert excluded == {logged["failed"]: "FAILED", logged["running"]: "RUNNING"}
    text = "\n".join(printed)
    assert "| infoprompt | 64 | 3 | 0.8300 ± 0.0200 | 0.8200 ± 0.0200 |" in text
    assert "[k_shot=64]: test accuracy difference +0.0967 over 3 paired seeds: significant" in text
    assert "[k_shot=256]" in text and "not significant" in text
    assert logged["failed"] in text.split("## Not included")[1] and logged["running"] in text.split("## Not included")[1]

    assert sorted(p.name for p in res.plots) == ["losses__k_shot=256.png", "losses__k_shot=256.svg",
                                                 "losses__k_shot=64.png", "losses__k_shot=64.svg",
                                                 "val_accuracy.png", "val_accuracy.svg"]
    for p in res.plots:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(p).shape[0] > 300
    # Paper-grade: the SVGs keep their text, so what a reader sees can be checked.
    val = svg_text(tmp_path / "val_accuracy.svg")
    assert f"{EXPERIMENT} — rotten_tomatoes: validation accuracy during training" in val  # experiment + task
    assert "optimizer step" in val and "validation accuracy (fraction correct)" in val  # axes with units
    assert "infoprompt (n=3 seeds)" in val and "prompt (n=3 seeds)" in val  # method and n in the legend
    assert "± 1 sample std over seeds" in val  # the band is explained
    assert "k_shot=64" in val and "k_shot=256" in val  # one panel per cell, in one figure
    losses = svg_text(tmp_path / "losses__k_shot=64.svg")
    assert "total loss of infoprompt (its own objective)" in losses  # objectives that are not comparable:
    assert "total loss of prompt (its own objective)" in losses  # each on its own panel
    assert "classification cross-entropy" in losses and "loss (nats per example)" in losses
    assert "L_head (InfoNCE, unweighted)" in losses and "± 1 sample std over seeds" in losses
    assert (tmp_path / "comparison.csv").read_text().startswith("method,k_shot,seeds,")

    client = MlflowClient(server.uri)
    run = client.get_run(res.run_id)
    assert run.data.tags["infoprompt.role"] == "comparison" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(res.run_id)} == {"comparison.csv", "comparison.md",
                                                                   "significance.csv", "plots"}
    assert f"#/experiments/{run.info.experiment_id}/runs?searchFilter=" in text  # the UI link
    # A second comparison ignores the first one's run.
    again = compare(Options(experiment=EXPERIMENT, tracking_uri=server.uri, target=0.75, output_dir=tmp_path,
                            log_to_mlflow=False), echo=lambda *_: None)
    assert len(again.table) == 4 and len(again.excluded) == 2


def svg_text(path) -> str:
    """Every text element of a matplotlib SVG (saved with svg.fonttype=none: text stays text)."""
    import html
    import re

    return "\n".join(html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


def compare_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infoprompt_ds.compare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_unknown_experiment_is_one_line(server):
    r = compare_cli("--experiment", "nope", "--tracking_uri", server.uri)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: experiment: no experiment named 'nope' at {server.uri}; it has: ")


def test_cli_unknown_metric_names_the_available_ones(server, logged, tmp_path):
    r = compare_cli("--experiment", EXPERIMENT, "--tracking_uri", server.uri, "--metric", "bogus", "--no_log",
                    "--output_dir", str(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"error: metric: no run of '{EXPERIMENT}' has test/bogus; available: accuracy"]


def test_one_seed_shows_no_std(server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp_id = client.create_experiment("one-seed")
    for method, acc in (("infoprompt", 0.8), ("prompt", 0.7)):
        log_run(client, exp_id, "64", method, 0, acc)
    printed = []
    compare(Options(experiment="one-seed", tracking_uri=server.uri, output_dir=tmp_path, log_to_mlflow=False),
            echo=printed.append)
    text = "\n".join(printed)
    assert "| infoprompt | 1 | 0.8100 | 0.8000 |" in text and "±" not in text.split("| method")[1].split("## Significance")[0]
    assert "infoprompt (n=1 seed)" in svg_text(tmp_path / "val_accuracy.svg")


def test_compare_finds_a_sweep_store_by_name_or_folder_with_no_other_flag(tmp_path):
    """What a sweep without a server leaves: <output_root>/mlflow.db with a parent run and its children.
    `compare --sweep NAME` (from where the sweep ran: outputs/sweeps/NAME) and `compare --sweep FOLDER`
    find the store, the experiment and the sweep by themselves."""
    import os

    from mlflow import MlflowClient

    from infoprompt_ds.tracking.store import default_store

    root = tmp_path / "outputs" / "sweeps" / "tiny"
    root.mkdir(parents=True)
    client = MlflowClient(default_store(root).uri)
    exp_id = client.create_experiment("tiny-exp")
    parent = client.create_run(exp_id, tags={"sweep.role": "parent", "sweep.name": "tiny"}, run_name="tiny")
    for method, accs in (("infoprompt", [0.8, 0.9]), ("prompt", [0.7, 0.75])):
        for seed, acc in enumerate(accs):
            rid = log_run(client, exp_id, "64", method, seed, acc)
            client.set_tag(rid, "sweep.name", "tiny")
            client.set_tag(rid, "sweep.role", "child")
            client.set_tag(rid, "mlflow.parentRunId", parent.info.run_id)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    for where, cwd in (("tiny", tmp_path), (str(root), ROOT)):
        r = subprocess.run([sys.executable, "-m", "infoprompt_ds.compare", "--sweep", where, "--no_log",
                            "--output_dir", str(tmp_path / "cmp")], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "# tiny-exp: 4 finished runs (sweep tiny)" in r.stdout
        assert "| infoprompt | 2 |" in r.stdout and "| prompt | 2 |" in r.stdout
        assert "searchFilter=tags.%60sweep.name%60%20%3D%20%27tiny%27" in r.stdout
    r = subprocess.run([sys.executable, "-m", "infoprompt_ds.compare", "--sweep", "nope"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: sweep: no sweep store at outputs/sweeps/nope/mlflow.db; pass the sweep's name (run where the sweep "
        "ran) or its output_root folder, or --tracking_uri"]
