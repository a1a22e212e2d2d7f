"""compare's numbers on runs with known values, logged to a real `mlflow server` with MlflowClient (the
same shape of runs the training logs): grouping by all but the seed, mean ± std, steps and seconds to
target, the paired test, plots, artifacts, and failed/running runs listed instead of averaged in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from infoprompt_ds.compare import Options, compare
from infoprompt_ds.tracking import LocalServer


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
              "run_name": f"{method}-k{k_shot}-s{seed}"}
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

    assert sorted(p.name for p in res.plots) == ["losses__k_shot=256.png", "losses__k_shot=64.png",
                                                 "val_accuracy__k_shot=256.png", "val_accuracy__k_shot=64.png"]
    for p in res.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(p).shape[0] > 100
    assert (tmp_path / "comparison.csv").read_text().startswith("method,k_shot,seeds,")

    client = MlflowClient(server.uri)
    run = client.get_run(res.run_id)
    assert run.data.tags["infoprompt.role"] == "comparison" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(res.run_id)} == {"comparison.csv", "comparison.md",
                                                                   "significance.csv", "plots"}
    # A second comparison ignores the first one's run.
    again = compare(Options(experiment=EXPERIMENT, tracking_uri=server.uri, target=0.75, output_dir=tmp_path,
                            log_to_mlflow=False), echo=lambda *_: None)
    assert len(again.table) == 4 and len(again.excluded) == 2


def test_cli_unknown_experiment_is_one_line(server):
    r = subprocess.run([sys.executable, "-m", "infoprompt_ds.compare", "--experiment", "nope", "--tracking_uri",
                        server.uri], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: experiment: no experiment named 'nope' at {server.uri}"]

