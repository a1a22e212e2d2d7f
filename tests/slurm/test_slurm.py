"""SLURM launch scripts (slurm/run.sh, slurm/task.sh, slurm/sweep.sh), tested two ways:

* the scripts' decisions (requeue or not, resume or not, bounded restarts, rank environment, signal
  forwarding) against fake `srun`/`scontrol` commands: seconds, no cluster needed;
* real jobs on the project's two-node test cluster, tests/slurm/cluster.sh (nodes n1 and n2, one CPU each, this
  machine's filesystem): a 2-node ZeRO-3 run, a job requeued mid-training (`scontrol requeue`: SIGTERM
  path), a job that hits its time limit (SLURM's own `--signal=B:USR1@...`: the script requeues itself),
  a failing job that must not requeue, a job-array sweep and an `salloc` run. The interrupted jobs must
  export the same trainable weights as the uninterrupted run, bit for bit.

Everything here carries the `slurm` marker (`python -m pytest -m slurm`; CI: .ci/slurm.sh). The cluster
tests need root; they bring the cluster up if it is not (and down again afterwards), and skip with the
reason when that is impossible, unless INFOPROMPT_REQUIRE_SLURM=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_args

pytestmark = pytest.mark.slurm

RUN_SH = ROOT / "slurm" / "run.sh"
TASK_SH = ROOT / "slurm" / "task.sh"
SWEEP_SH = ROOT / "slurm" / "sweep.sh"
EXPORT = Path("export") / "infoprompt.safetensors"


# ===================================================================================================
# 1. Script logic against fake srun / scontrol
# ===================================================================================================

FAKE_SRUN = r"""#!/bin/bash
# records its arguments; "runs" SLURM_NTASKS ranks that end with the codes in FAKE_RCS
# (and, with FAKE_CKPT, leave a complete checkpoint of that name in FAKE_OUT)
printf '%s\n' "$@" > "$FAKE_LOG/srun.args"
read -ra rcs <<<"${FAKE_RCS:-0}"
for ((r = 0; r < SLURM_NTASKS; r++)); do echo "${rcs[r]:-${rcs[0]}}" > "$INFOPROMPT_RC_DIR/rank$r.rc"; done
if [[ -n ${FAKE_CKPT:-} ]]; then
  mkdir -p "$FAKE_OUT/checkpoints/$FAKE_CKPT"
  echo '{"global_step": 1}' > "$FAKE_OUT/checkpoints/$FAKE_CKPT/infoprompt_complete.json"
  echo "$FAKE_CKPT" > "$FAKE_OUT/checkpoints/latest"
fi
exit 0
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo fakenode1; echo fakenode2 ;;
  requeue*) echo "$2" >> "$FAKE_LOG/requeue" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"

    def run(restart=0, rcs="0", ckpt_after="", args=None, checkpoint_before="", finished=False, **env):
        if checkpoint_before:
            d = out / "checkpoints" / checkpoint_before
            d.mkdir(parents=True, exist_ok=True)
            (d / "infoprompt_complete.json").write_text('{"global_step": 1}')
            (out / "checkpoints" / "latest").write_text(checkpoint_before)
        if finished:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text("{}")
        for f in ("srun.args", "requeue"):
            (tmp_path / f).unlink(missing_ok=True)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, ENVIRONMENT="BATCH",
                        SLURM_JOB_ID="4242", SLURM_JOB_NAME="fake", SLURM_NTASKS="2", SLURM_NNODES="2",
                        SLURM_JOB_NODELIST="fakenode[1-2]", SLURM_SUBMIT_DIR=str(ROOT),
                        SLURM_RESTART_COUNT=str(restart), LOG_ROOT=str(tmp_path / "logs"), FAKE_LOG=str(tmp_path),
                        FAKE_RCS=rcs, FAKE_CKPT=ckpt_after, FAKE_OUT=str(out))
        full_env.update(env)
        p = subprocess.run(["bash", str(RUN_SH), *(args if args is not None else ["--output_dir", str(out)])],
                           env=full_env, capture_output=True, text=True, timeout=60)
        srun = (tmp_path / "srun.args").read_text().splitlines() if (tmp_path / "srun.args").exists() else None
        requeued = (tmp_path / "requeue").exists()
        return p, srun, requeued

    run.out = out
    return run


def test_finished_run_exits_0_without_requeue(fake_slurm):
    p, srun, requeued = fake_slurm(rcs="0 0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert srun is not None and not requeued
    assert srun[:2] == ["--kill-on-bad-exit=1", f"--output={fake_slurm.out.parent}/logs/fake-4242/attempt0/%N-rank%t.log"]
    assert srun[srun.index("bash") + 1:srun.index("bash") + 4] == [str(TASK_SH), sys.executable, str(ROOT / "train.py")]
    assert "--resume_from_checkpoint" not in srun
    assert "rendezvous fakenode1:" in p.stdout and "world size 2" in p.stdout


def test_preempted_ranks_requeue_the_job(fake_slurm):
    p, srun, requeued = fake_slurm(rcs="75 75", ckpt_after="step7")
    assert p.returncode == 75, p.stdout + p.stderr
    assert requeued and "requeuing job 4242 (restart 1): it resumes from step7" in p.stdout


def test_requeued_job_resumes_from_latest_checkpoint(fake_slurm):
    p, srun, requeued = fake_slurm(restart=1, rcs="0 0", checkpoint_before="step7")
    assert p.returncode == 0, p.stdout + p.stderr
    assert srun[-2:] == ["--resume_from_checkpoint", "latest"] and not requeued
    assert "resuming from" in p.stdout and "attempt1" in p.stdout


def test_fresh_submission_does_not_resume_unless_asked(fake_slurm):
    p, srun, _ = fake_slurm(restart=0, checkpoint_before="step7")
    assert "--resume_from_checkpoint" not in srun
    p, srun, _ = fake_slurm(restart=0, checkpoint_before="step7", RESUME="auto")
    assert srun[-2:] == ["--resume_from_checkpoint", "latest"]


def test_requeue_without_checkpoint_starts_over(fake_slurm):
    p, srun, _ = fake_slurm(restart=1, rcs="0 0")
    assert p.returncode == 0 and "--resume_from_checkpoint" not in srun
    assert "no complete checkpoint" in p.stdout


def test_requeued_job_that_had_finished_does_nothing(fake_slurm):
    p, srun, requeued = fake_slurm(restart=1, checkpoint_before="step9", finished=True)
    assert p.returncode == 0 and srun is None and not requeued


def test_real_error_is_never_requeued(fake_slurm):
    # the job's exit code is the root cause: a rank's own error beats the SIGTERM srun sent the others
    for rcs, code in (("1 1", 1), ("75 1", 1), ("0 137", 137), ("143 2", 2)):
        p, srun, requeued = fake_slurm(rcs=rcs, ckpt_after="step3")
        assert p.returncode == code and not requeued, (rcs, p.stdout)
        assert f"training failed (rank exit code {code}): not requeued" in p.stdout


def test_restarts_are_bounded(fake_slurm):
    p, srun, requeued = fake_slurm(restart=3, rcs="75 75", ckpt_after="step9", checkpoint_before="step8",
                                   MAX_RESTARTS="3")
    assert p.returncode == 75 and not requeued and "MAX_RESTARTS=3" in p.stdout
    p, srun, requeued = fake_slurm(restart=4, MAX_RESTARTS="3")
    assert p.returncode == 1 and srun is None and not requeued and "giving up" in p.stderr


def test_no_progress_is_not_requeued(fake_slurm):
    p, srun, requeued = fake_slurm(restart=1, rcs="75 75", ckpt_after="step8", checkpoint_before="step8")
    assert p.returncode == 75 and not requeued and "no progress" in p.stdout


def test_interactive_run_is_not_requeued(fake_slurm):
    p, srun, requeued = fake_slurm(rcs="75 75", ckpt_after="step8", ENVIRONMENT="")
    assert p.returncode == 75 and not requeued and "RESUME=auto" in p.stdout
    assert "/interactive-" in srun[1]


def test_bad_arguments_fail_before_srun(fake_slurm):
    p, srun, requeued = fake_slurm(args=["--learning_rate", "-1"])
    assert p.returncode == 2 and srun is None and not requeued
    assert "learning_rate: must be > 0" in p.stderr


def test_default_output_dir_is_per_job(fake_slurm):
    p, srun, _ = fake_slurm(args=["--seed", "3"])
    i = srun.index("--output_dir")
    assert srun[i + 1] == str(ROOT / "outputs" / "fake-4242")


def test_task_wrapper_maps_ranks_and_forwards_signals(tmp_path):
    """task.sh: SLURM ids -> torch.distributed env; USR1 reaches the rank; exit 75 -> srun sees 0, .rc keeps 75."""
    child = ("import os, signal, sys, time\n"
             "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
             "print(*(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'OMP_NUM_THREADS')), flush=True)\n"
             "time.sleep(60)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    env.update(SLURM_PROCID="7", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NODEID="3",
               SLURM_STEP_TASKS_PER_NODE="2(x3),2", SLURM_CPUS_ON_NODE="8", INFOPROMPT_RC_DIR=str(tmp_path),
               MASTER_ADDR="n1", MASTER_PORT="1234")
    p = subprocess.Popen(["bash", str(TASK_SH), sys.executable, "-c", child], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if re.fullmatch(r"[\d ]+\n", line):
            break
    assert lines[-1].split() == ["7", "8", "1", "2", "4"], lines
    p.send_signal(signal.SIGUSR1)
    rest = p.stdout.read()
    assert p.wait(timeout=30) == 0, rest
    assert (tmp_path / "rank7.rc").read_text().strip() == "75"


def test_sweep_grid(tmp_path):
    p = subprocess.run(["bash", str(SWEEP_SH), "--plan"], env={**os.environ, "SWEEP": "method=infoprompt,prompt seed=1,2,3"},
                       capture_output=True, text=True)
    assert p.returncode == 0 and "grid (6 runs)" in p.stdout and "--array=0-5%2" in p.stdout
    assert "  4: --method prompt --seed 2" in p.stdout


# ===================================================================================================
# 2. Real jobs on the two-node cluster
# ===================================================================================================

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
# 400 steps: about a minute of training here, so a signal sent after the first checkpoint arrives mid-run.
STEPS = 400


def _cluster_script() -> Path | None:
    # the repository's own cluster script (tests/slurm/cluster.sh); SLURM_CLUSTER_SH points at another one
    for cand in (os.environ.get("SLURM_CLUSTER_SH"), ROOT / "tests" / "slurm" / "cluster.sh"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def _nodes_ready() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = dict(line.split() for line in out.splitlines() if line.strip())
    return all(states.get(n) in ("idle", "mix", "alloc") for n in ("n1", "n2"))


def _unavailable(reason: str):
    if os.environ.get("INFOPROMPT_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM cluster required (INFOPROMPT_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster: used as it is when already up, else brought up here and down afterwards."""
    if _nodes_ready():
        yield
        return
    if os.geteuid() != 0:
        _unavailable("the SLURM cluster tests need root (tests/slurm/cluster.sh creates network namespaces)")
    script = _cluster_script()
    if script is None:
        _unavailable("no cluster script (looked at $SLURM_CLUSTER_SH and tests/slurm/cluster.sh)")
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0 or not _nodes_ready():
        subprocess.run(["bash", str(script), "down"], capture_output=True, timeout=300)
        _unavailable(f"the SLURM cluster did not start: {(up.stderr or up.stdout).strip()[-800:]}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(script), "down"], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def slurm_env(cluster, tmp_path_factory):
    """Where the jobs write (the shared filesystem), and the environment sbatch exports to them: the MLflow
    tracking URI (a sqlite file here; an experiment with its artifact store in the same folder), the
    interface gloo uses on the nodes (NET_IFNAME, run.sh's knob), and the per-job log folder."""
    import mlflow

    base = tmp_path_factory.mktemp("slurm_runs")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("slurm-tests", artifact_location=(base / "mlartifacts").as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env.update(MLFLOW_TRACKING_URI=uri, NET_IFNAME="eth0", LOG_ROOT=str(base / "logs"), PYTHON=sys.executable,
               PYTHONUNBUFFERED="1")
    return {"base": base, "env": env, "client": client, "experiment_id": exp}


def job_args(tiny_bert, files, out, **over) -> list[str]:
    base = dict(max_steps=STEPS, logging_steps=20, eval_steps=100, save_steps=20, mlflow_experiment="slurm-tests",
                dist_timeout_minutes=3)
    return tiny_args(tiny_bert, files, out, **{**base, **over})


def sbatch(slurm_env, name: str, args: list[str], *opts: str, script: Path = RUN_SH, env: dict | None = None) -> str:
    logs = slurm_env["base"] / "logs"
    logs.mkdir(exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={logs}/%x-%j.out", *opts, str(script), *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**slurm_env["env"], **(env or {})}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_info(job: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as dicts (one per array task); [] once the job has left slurmctld's memory."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    rows = []
    for line in p.stdout.splitlines():
        rows.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
    return rows


def batch_log(slurm_env, name: str, job: str) -> str:
    f = slurm_env["base"] / "logs" / f"{name}-{job}.out"
    return f.read_text(errors="replace") if f.exists() else "(no batch log)"


def rank_logs(slurm_env, name: str, job: str) -> str:
    d = slurm_env["base"] / "logs" / f"{name}-{job}"
    return "\n".join(f"--- {f}\n" + f.read_text(errors="replace")[-3000:] for f in sorted(d.rglob("*.log")))


def wait_job(slurm_env, name: str, job: str, timeout: float, on_requeued=None) -> dict[str, str]:
    """Wait for a terminal state. A requeued job waits ~2 min (BeginTime = requeue + credential lifetime)
    before SLURM starts it again; the tests let it start at once (`scontrol update StartTime=now`)."""
    deadline = time.monotonic() + timeout
    handled = set()
    info = {}
    while time.monotonic() < deadline:
        rows = job_info(job)
        if rows:
            info = rows[0]
            if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) > 0 \
                    and info["Restarts"] not in handled:
                handled.add(info["Restarts"])
                if on_requeued:
                    on_requeued()
                # SLURM revokes the old job credential at the requeue; a start within the same second gets
                # "Job credential revoked" and the job FAILS. Wait past it, then skip the rest of the delay.
                time.sleep(3)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
            if info.get("JobState") in TERMINAL:
                # A job that requeues itself (run.sh: `scontrol requeue`, then exit 75) can show a terminal
                # state for a moment before slurmctld marks it PENDING again: only a state that holds counts.
                time.sleep(5)
                again = job_info(job)
                if not again or (again[0].get("JobState") == info["JobState"]
                                 and again[0].get("Restarts") == info.get("Restarts")):
                    return again[0] if again else info
                continue
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    pytest.fail(f"job {job} did not finish in {timeout:.0f}s (last state {info.get('JobState')})\n"
                f"{batch_log(slurm_env, name, job)}\n{rank_logs(slurm_env, name, job)}")


def wait_for(path: Path, job: str, slurm_env, name: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        rows = job_info(job)
        if rows and rows[0].get("JobState") in TERMINAL:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    pytest.fail(f"{path} did not appear\n{batch_log(slurm_env, name, job)}\n{rank_logs(slurm_env, name, job)}")


def assert_completed(info: dict, slurm_env, name: str, job: str, restarts: int):
    detail = f"\n{batch_log(slurm_env, name, job)}\n{rank_logs(slurm_env, name, job)}"
    assert info.get("JobState") == "COMPLETED", f"state {info.get('JobState')}" + detail
    assert int(info.get("Restarts", -1)) == restarts, f"restarts {info.get('Restarts')}" + detail


def the_run(slurm_env, out: Path):
    """The one MLflow run of this output_dir (a resumed job must not have started a second one)."""
    runs = slurm_env["client"].search_runs([slurm_env["experiment_id"]], filter_string=f"params.output_dir = '{out}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def load_weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / EXPORT))


def assert_same_weights(out: Path, ref: Path):
    a, b = load_weights(out), load_weights(ref)
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not a[k].equal(b[k])}
    assert not diff, f"resumed run differs from the uninterrupted one (max |diff| per tensor): {diff}"


@pytest.fixture(scope="module")
def reference(slurm_env, tiny_bert, sentiment_files):
    """The uninterrupted 2-node run every interrupted job is compared with."""
    name, out = "ip-ref", slurm_env["base"] / "ref"
    job = sbatch(slurm_env, name, job_args(tiny_bert, sentiment_files, out), "--nodes=2")
    info = wait_job(slurm_env, name, job, timeout=300)
    return {"name": name, "job": job, "out": out, "info": info}


def test_two_node_zero3_run(reference, slurm_env):
    name, job, out = reference["name"], reference["job"], reference["out"]
    assert_completed(reference["info"], slurm_env, name, job, restarts=0)
    # both nodes took part: rank 0 on n1, rank 1 on n2, one per node, each with its own log
    logs = slurm_env["base"] / "logs" / f"{name}-{job}" / "attempt0"
    assert sorted(p.name for p in logs.glob("*.log")) == ["n1-rank0.log", "n2-rank1.log"]
    assert "[task.sh] rank 0/2 local 0/1 on n1" in (logs / "n1-rank0.log").read_text()
    assert "[task.sh] rank 1/2 local 0/1 on n2" in (logs / "n2-rank1.log").read_text()
    # ZeRO-3 partitioned the frozen backbone across the two nodes
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = ranks[0]["backbone_params_total"]
    assert all(r["world_size"] == 2 and r["backbone_params_total"] == total for r in ranks)
    assert all(r["backbone_params_local"] < 0.75 * total for r in ranks), ranks
    assert sum(r["backbone_params_local"] for r in ranks) >= total
    # finished, and in MLflow (through the MLFLOW_TRACKING_URI the job inherited)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS and metrics["world_size"] == 2
    run = the_run(slurm_env, out)
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["zero_stage"] == "3"
    assert "test/accuracy" in run.data.metrics
    assert (out / EXPORT).is_file()
    import infoprompt_ds.tracking.run_metadata as run_metadata

    if hasattr(run_metadata, "ENV_TAGS"):  # the tracker takes extra tags from run.sh (INFOPROMPT_MLFLOW_TAGS)
        assert run.data.tags.get("slurm_job_id") == job and run.data.tags.get("slurm_job_name") == name


def _check_resumed(slurm_env, reference, name, job, out, info, signal_name):
    assert_completed(info, slurm_env, name, job, restarts=1)
    log = batch_log(slurm_env, name, job)
    stopped = re.search(rf"stopped at checkpoint step(\d+) \(signal {signal_name}\)", log)
    assert stopped and 0 < int(stopped.group(1)) < STEPS, log  # interrupted mid-training ...
    assert f"resuming from {out}/checkpoints/step{stopped.group(1)}" in log, log  # ... and resumed from there
    assert_same_weights(out, reference["out"])
    # the same MLflow run, with metrics from before and after the interruption
    metrics = json.loads((out / "metrics.json").read_text())
    run = the_run(slurm_env, out)
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"
    steps = [m.step for m in slurm_env["client"].get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(20, STEPS + 1, 20)), steps
    return int(stopped.group(1))


def test_scontrol_requeue_resumes_exactly(reference, slurm_env, tiny_bert, sentiment_files):
    """Requeue (what preemption with PreemptMode=REQUEUE does): SIGTERM to every rank mid-training; they
    checkpoint, SLURM requeues; the restart resumes and ends with the uninterrupted run's weights."""
    name, out = "ip-requeue", slurm_env["base"] / "requeue"
    job = sbatch(slurm_env, name, job_args(tiny_bert, sentiment_files, out), "--nodes=2")
    wait_for(out / "checkpoints" / "latest", job, slurm_env, name)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    info = wait_job(slurm_env, name, job, timeout=300)
    _check_resumed(slurm_env, reference, name, job, out, info, "TERM")


def test_time_limit_requeues_and_resumes(reference, slurm_env, tiny_bert, sentiment_files):
    """The time-limit warning is real: the job runs with --signal=B:USR1@55 and, once training is under way,
    its limit drops to 1 minute, so SLURM itself sends USR1 to the batch script; run.sh hands it to the ranks,
    they checkpoint and run.sh requeues the job. (The restart gets its 5 minutes back.)"""
    name, out = "ip-timelimit", slurm_env["base"] / "timelimit"
    job = sbatch(slurm_env, name, job_args(tiny_bert, sentiment_files, out), "--nodes=2", "--time=5",
                 "--signal=B:USR1@55")
    wait_for(out / "checkpoints" / "latest", job, slurm_env, name)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=1"], check=True, timeout=30)

    def restore_limit():
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=5"], capture_output=True, timeout=30)

    info = wait_job(slurm_env, name, job, timeout=360, on_requeued=restore_limit)
    _check_resumed(slurm_env, reference, name, job, out, info, "USR1")
    log = batch_log(slurm_env, name, job)
    assert "received SIGUSR1" in log and f"requeuing job {job} (restart 1)" in log, log


def test_failing_job_is_not_requeued(slurm_env, tiny_bert, sentiment_files):
    name, out = "ip-fail", slurm_env["base"] / "fail"
    args = job_args(tiny_bert, sentiment_files, out, model_name_or_path=str(slurm_env["base"] / "no-such-model"))
    job = sbatch(slurm_env, name, args, "--nodes=2")
    info = wait_job(slurm_env, name, job, timeout=180)
    log = batch_log(slurm_env, name, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "2:0", (info, log)
    assert "training failed (rank exit code 2): not requeued" in log, log


def test_sweep_job_array(slurm_env, tiny_bert, sentiment_files):
    """Two array tasks (seeds), at most one at a time (%1), one node each; each is a complete run in MLflow."""
    name, sweep_dir = "ip-sweep", slurm_env["base"] / "sweep"
    args = job_args(tiny_bert, sentiment_files, slurm_env["base"] / "unused", max_steps=6, save_steps=0, eval_steps=6)
    args = [a for i, a in enumerate(args) if a != "--output_dir" and (i == 0 or args[i - 1] != "--output_dir")]
    job = sbatch(slurm_env, name, args, "--array=0-1%1", "--nodes=1", script=SWEEP_SH,
                 env={"SWEEP": "seed=1,2", "SWEEP_DIR": str(sweep_dir)})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        tasks = [t for t in job_info(job) if t.get("ArrayTaskId", "").isdigit()]
        if len(tasks) == 2 and all(t["JobState"] in TERMINAL for t in tasks):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job], capture_output=True)
        pytest.fail(f"sweep {job} did not finish: {job_info(job)}")
    tasks.sort(key=lambda t: int(t["ArrayTaskId"]))
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"], tasks
    assert tasks[0]["EndTime"] <= tasks[1]["StartTime"], "the %1 limit let both tasks run at once"
    for seed in (1, 2):
        out = sweep_dir / f"seed-{seed}"
        assert json.loads((out / "config.json").read_text())["seed"] == seed
        assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
        assert the_run(slurm_env, out).info.status == "FINISHED"


def test_salloc_interactive(slurm_env, tiny_bert, sentiment_files):
    """The interactive variant: salloc an allocation and run the same script inside it."""
    out = slurm_env["base"] / "salloc"
    args = job_args(tiny_bert, sentiment_files, out, max_steps=6, save_steps=0, eval_steps=6)
    p = subprocess.run(["salloc", "--nodes=2", "--ntasks-per-node=1", "--job-name=ip-salloc", "bash", str(RUN_SH),
                        *args], cwd=ROOT, env=slurm_env["env"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "training finished" in p.stdout
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    logs = list((slurm_env["base"] / "logs").glob("ip-salloc-*/interactive-*/*.log"))
    assert sorted(p.name for p in logs) == ["n1-rank0.log", "n2-rank1.log"]
