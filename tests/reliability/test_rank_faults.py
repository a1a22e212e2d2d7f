"""A rank dies, and a graceful stop, on the real 2-rank job (`deepspeed --num_gpus 2 train.py --deepspeed
ds_configs/zero3.json`, gloo on CPU), against an uninterrupted run of the same seed.

One chain of launches into one output_dir:
  A. SIGKILL one rank (chosen at random) at a random step: the launcher and the other rank must end,
     non-zero, within a bound (collective timeout 1 minute); `latest` names an intact checkpoint.
  B. resume, then SIGTERM one rank at a random later step: every rank finishes the step, saves, the
     MLflow run is KILLED, exit code 75.
  C. resume to the end: trainable weights bitwise equal to the uninterrupted run (fp32 on CPU), and the
     MLflow run is the same one, now FINISHED.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_args
from reliability_lib import deepspeed_cmd, kill_session, launch, rank_pids, record, seed, wait_until

pytestmark = pytest.mark.reliability

# A tiny step takes ~0.1 s, so the run must be long enough that the SIGTERM in B (sent just after the
# first checkpoint past the resume point) still lands mid-training: with 16 steps a run killed late in A
# resumed at 12 and could finish before the signal (seen in CI: rc 0 instead of 75).
MAX_STEPS, SAVE_STEPS = 64, 2
EXIT_BOUND_S = 300  # 1 min collective timeout + the launcher's 30 s terminate grace + a loaded machine


def job_args(model, files, out: Path, experiment: str, **over) -> list[str]:
    return tiny_args(model, files, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=3,
                     eval_steps=1000, dist_timeout_minutes=1, mlflow_experiment=experiment, **over)


def checkpoint_step(out: Path) -> int:
    from infoprompt_ds.runtime.checkpoint import resolve_checkpoint

    try:
        return json.loads((resolve_checkpoint("latest", str(out)) / "infoprompt_complete.json").read_text())["global_step"]
    except Exception:  # noqa: BLE001 - none yet
        return 0


def run_to_end(cmd, log: Path, timeout: float = 900) -> int:
    proc = launch(cmd, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_session(proc)


def mlflow_runs(out: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_bert, sentiment_files):
    rng = random.Random(seed())
    work = tmp_path_factory.mktemp("rank_faults")
    ref, out = work / "reference", work / "chain"
    exp_ref, exp = f"rel-ref-{uuid.uuid4().hex[:8]}", f"rel-chain-{uuid.uuid4().hex[:8]}"
    facts: dict = {}

    facts["reference_rc"] = run_to_end(deepspeed_cmd(job_args(tiny_bert, sentiment_files, ref, exp_ref)),
                                       work / "reference.log")

    # A. SIGKILL a rank at a random step
    proc = launch(deepspeed_cmd(job_args(tiny_bert, sentiment_files, out, exp)), work / "a.log")
    try:
        ranks = rank_pids(proc, 2)
        after = rng.choice([2, 4, 6])  # wait for this checkpoint, then a random moment of training
        assert wait_until(lambda: checkpoint_step(out) >= after, 600, proc), "no progress before the kill"
        time.sleep(rng.uniform(0, 1.0))
        victim = rng.choice([0, 1])
        assert proc.poll() is None, "the job ended before the kill"
        t_kill = time.time()
        os.kill(ranks[victim], signal.SIGKILL)
        ended = wait_until(lambda: proc.poll() is not None, EXIT_BOUND_S, poll=0.5)
        facts["a"] = {"victim_rank": victim, "rc": proc.poll(), "exit_after_s": round(time.time() - t_kill, 1),
                      "ended_in_bound": ended, "latest_step": checkpoint_step(out),
                      "ranks_left": [r for r, pid in ranks.items() if _alive(pid)]}
    finally:
        kill_session(proc)

    # B. resume, SIGTERM one rank at a random later step
    resumed_from = facts["a"]["latest_step"]
    assert resumed_from <= MAX_STEPS // 2, f"A ran to step {resumed_from} before dying: too little left for B"
    proc = launch(deepspeed_cmd(job_args(tiny_bert, sentiment_files, out, exp, resume_from_checkpoint="latest")),
                  work / "b.log")
    try:
        ranks = rank_pids(proc, 2)
        assert wait_until(lambda: checkpoint_step(out) > resumed_from, 600, proc), "no progress after resume"
        time.sleep(rng.uniform(0, 0.3))
        victim = rng.choice([0, 1])
        sent = proc.poll() is None and checkpoint_step(out) < MAX_STEPS - 2
        os.kill(ranks[victim], signal.SIGTERM)
        proc.wait(timeout=EXIT_BOUND_S)
        facts["b"] = {"victim_rank": victim, "signal_sent_while_running": sent, "rc": proc.returncode,
                      "resumed_from": resumed_from, "latest_step": checkpoint_step(out),
                      "runs": [(r.info.run_id, r.info.status) for r in mlflow_runs(out, exp)]}
    finally:
        kill_session(proc)

    # C. resume to the end
    facts["c_rc"] = run_to_end(deepspeed_cmd(job_args(tiny_bert, sentiment_files, out, exp,
                                                      resume_from_checkpoint="latest")), work / "c.log")
    facts["runs_after"] = [(r.info.run_id, r.info.status) for r in mlflow_runs(out, exp)]
    facts["logs"] = {k: (work / f"{k}.log").read_text()[-4000:] for k in ("reference", "a", "b", "c")}
    return ref, out, facts


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_rank_killed_job_ends_in_bounded_time_with_intact_checkpoint(chain):
    _, out, facts = chain
    a = facts["a"]
    assert facts["reference_rc"] == 0, facts["logs"]["reference"]
    assert a["ended_in_bound"] and a["rc"] not in (0, None), (a, facts["logs"]["a"])
    assert a["ranks_left"] == [], a  # no orphan rank keeps running
    assert a["latest_step"] >= 2
    from infoprompt_ds.runtime.checkpoint import resolve_checkpoint, verify_checkpoint_files

    verify_checkpoint_files(resolve_checkpoint("latest", str(out)))  # loads with weights_only=True
    record("rank_kill", injected=1, survived=int(a["ended_in_bound"] and a["rc"] != 0 and not a["ranks_left"]),
           exit_after_s=a["exit_after_s"], victim_rank=a["victim_rank"], latest_step=a["latest_step"])


def test_sigterm_on_one_rank_stops_every_rank_gracefully(chain):
    _, _, facts = chain
    b = facts["b"]
    assert b["signal_sent_while_running"] and b["rc"] == 75, (b, facts["logs"]["b"])
    assert b["latest_step"] > b["resumed_from"]
    assert [status for _, status in b["runs"]] == ["KILLED"], b  # one run, closed as resumable
    record("graceful_stop", injected=1, survived=1, signal="SIGTERM", victim_rank=b["victim_rank"],
           stopped_at_step=b["latest_step"])


def test_resume_after_faults_matches_uninterrupted_run(chain):
    ref, out, facts = chain
    assert facts["c_rc"] == 0, facts["logs"]["c"]
    a = load_file(str(ref / "export" / "infoprompt.safetensors"))
    b = load_file(str(out / "export" / "infoprompt.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: fp32 on CPU, same data order, same noise
    # the same MLflow run went RUNNING -> (killed rank) -> KILLED (SIGTERM) -> FINISHED
    assert len(facts["runs_after"]) == 1 and facts["runs_after"][0][1] == "FINISHED", facts["runs_after"]
    assert facts["runs_after"][0][0] == facts["b"]["runs"][0][0]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == MAX_STEPS
    record("resume_exact", injected=0, survived=1, bitwise_equal=True, tensors=len(a))
