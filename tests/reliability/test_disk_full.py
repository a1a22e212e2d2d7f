"""Issue 34 item 4: the disk fills up during a checkpoint save. A real full disk: output_dir on a small
tmpfs (needs root to mount; skipped otherwise), filled by a ballast file once the first checkpoint is
complete, while a real `python train.py` keeps saving every 2 steps. Expected: one line naming the folder and
the bytes a checkpoint needs, exit 2, the last complete checkpoint still `latest`, the MLflow run FAILED
with the reason as a tag; a resume on the still-full disk is refused in pre-flight; once space is freed
the resume finishes."""

from __future__ import annotations


import pytest

from conftest import run_cli, tiny_args
from reliability_lib import (fill, small_tmpfs, assert_refused, kill_session, launch, python_cmd, record_case, stderr_lines,
                             wait_until)

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "disk_full")


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "16m") as where:
        yield where


def test_disk_full_during_a_save(small_disk, tiny_bert, sentiment_files, tmp_path):
    from mlflow import MlflowClient

    from infoprompt_ds.runtime.checkpoint import complete_checkpoints, resolve_checkpoint

    out, log = small_disk / "run", tmp_path / "log"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store is elsewhere: it can be told why
    env = {"MLFLOW_TRACKING_URI": uri}
    args = tiny_args(tiny_bert, sentiment_files, out, max_steps=2000, save_steps=2, save_total_limit=2,
                     eval_steps=100000)
    proc = launch(python_cmd(args), log, env=env)
    try:
        assert wait_until(lambda: (out / "checkpoints" / "latest").exists(), 300, proc), log.read_text()[-3000:]
        fill(small_disk / "ballast")
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc)
    text = log.read_text()
    errors = [ln for ln in stderr_lines(text) if ln.startswith("error: ")]
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: output_dir: disk full: the checkpoint step"), errors
    assert str(out / "checkpoints") in errors[0] and "bytes" in errors[0], errors
    done = complete_checkpoints(out / "checkpoints")
    assert done and resolve_checkpoint("latest", str(out)) == done[-1]
    assert f"the last complete checkpoint is {done[-1].name}" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == \
        sorted(d.name for d in done)  # the partial folder is gone
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FAILED" and "disk full" in run.data.tags["infoprompt.error"]
    # a resume on the still-full disk: refused before any weight loads, not a crash at its first save
    resume = [*args, "--resume_from_checkpoint", "latest"]
    assert_refused(resume, "output_dir", "bytes free, but a checkpoint needs", env=env)
    (small_disk / "ballast").unlink()
    step = int(done[-1].name[4:])
    resume[resume.index("--max_steps") + 1] = str(step + 2)
    r = run_cli(resume, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert resolve_checkpoint("latest", str(out)).name == f"step{step + 2}"
