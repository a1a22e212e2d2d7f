"""Nothing of another run lost or mixed in (issue 15, items 4-6, and divergence): the output-dir lock, a
fresh run in a used folder, overwriting, pruning only this run's checkpoints, `latest` outside the
checkpoints folder, a malformed marker at the final save, and a resume checked against the checkpoint's
run identity before any weight loads.

Two real trainings (`python train.py`, tiny BERT) build the chain: run A (4 steps, a checkpoint every 2),
then a resume to 8 steps in a folder where a foreign complete checkpoint and a malformed marker were
planted. The refusals in between run in process, through pre-flight only; a third real run diverges."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, tiny_args
from infoprompt_ds.config import ConfigError
from infoprompt_ds.config_load import parse_config
from infoprompt_ds.runtime.outdir import lock_output_dir
from reliability_lib import assert_refused, prepare_in_process, record_case

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "outdir_resume")


def _args(tiny_bert, files, out: Path, **over):
    return tiny_args(tiny_bert, files, out, **{"max_steps": 4, "save_steps": 2, "save_total_limit": 2,
                                              "eval_steps": 1000, **over})


@pytest.fixture(scope="module")
def run_a(tiny_bert, sentiment_files, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints step2, step4."""
    out = tmp_path_factory.mktemp("outdir") / "run"
    r = run_cli(_args(tiny_bert, sentiment_files, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _copy(run_a: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_a, out)
    (out / ".infoprompt.lock").unlink(missing_ok=True)
    return out


def test_fresh_run_refuses_a_folder_holding_a_run(run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    (out / "metrics.json").unlink()  # not finished: before, its files were deleted without a word
    before = (out / "config.json").read_bytes()
    assert_refused(_args(tiny_bert, sentiment_files, out), "output_dir", "holds another run")
    assert (out / "config.json").read_bytes() == before and (out / "checkpoints" / "step4").is_dir()


def test_overwrite_refuses_to_delete_files_it_did_not_write(run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    (out / "export" / "notes.txt").write_text("mine")
    assert_refused(_args(tiny_bert, sentiment_files, out, overwrite_output_dir="true"), "output_dir", "notes.txt")
    assert (out / "export" / "notes.txt").read_text() == "mine"


def test_overwrite_clears_only_our_files(run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    (out / "user_notes.txt").write_text("mine")
    code, lines, _ = prepare_in_process(_args(tiny_bert, sentiment_files, out, overwrite_output_dir="true"))
    assert code == "accepted", lines
    assert not (out / "checkpoints").exists() and not (out / "export").exists()
    assert (out / "user_notes.txt").read_text() == "mine"


def test_second_training_on_a_locked_folder(run_a, tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".infoprompt.lock", "a+") as held:  # what a running training holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345 on somehost\n")
        held.flush()
        assert_refused(_args(tiny_bert, sentiment_files, out), "output_dir", "in use by another training (pid 12345")


@pytest.mark.parametrize("plant", ["symlink", "foreign"])
def test_an_unsafe_lock_is_refused_and_nothing_written_through_it(plant, run_a, tiny_bert, sentiment_files, tmp_path):
    """Issue 34 item 1: a planted `.infoprompt.lock -> victim` (or another user's lock file) is refused in
    one line, and the victim keeps its content."""
    out = _copy(run_a, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = out / ".infoprompt.lock"
    if plant == "symlink":
        lock.symlink_to(victim)
    else:
        if os.geteuid() != 0:
            pytest.skip("another user's file needs root to make")
        shutil.copy(victim, lock)
        os.chown(lock, 65534, 65534)
    needle = "is a symlink" if plant == "symlink" else "belongs to uid 65534"
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"), "output_dir", needle)
    # The lock itself (a link planted after pre-flight): opened without following links, checked by fstat.
    with pytest.raises(ConfigError, match=needle):
        lock_output_dir(parse_config(["--output_dir", str(out), "--resume_from_checkpoint", "latest"]), 0)
    assert victim.read_text() == "precious\n"
    assert (lock.is_symlink() if plant == "symlink" else lock.read_text() == "precious\n")


def test_another_users_folder_is_refused_whatever_the_store(run_a, tiny_bert, sentiment_files, tmp_path):
    """Issue 34 item 1: with MLFLOW_TRACKING_URI elsewhere, an output_dir owned by another user is still
    refused (checkpoints and exports there could be swapped by that user)."""
    if os.geteuid() != 0:
        pytest.skip("another user's folder needs root to make")
    out = _copy(run_a, tmp_path)
    os.chown(out, 65534, 65534)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"), "output_dir",
                   "belongs to uid 65534", env=env)
    assert not (out / ".infoprompt.lock").exists()


def test_latest_pointing_outside(run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    (out / "checkpoints" / "latest").write_text(str(run_a / "checkpoints" / "step4"))
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"),
                   "resume_from_checkpoint", "not a checkpoint folder inside")


@pytest.mark.parametrize("over,needle", [
    ({"n_virtual_tokens": 6}, "prompt length"),
    ({"method": "prompt"}, "its method is 'infoprompt'"),
    ({"labels": "pos,neg"}, "label list"),
])
def test_resume_with_another_config(over, needle, run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    before = (out / "config.json").read_bytes()
    argv = _args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest", max_steps=8, **over)
    assert_refused(argv, "resume_from_checkpoint", needle)
    assert (out / "config.json").read_bytes() == before  # a refused attempt writes nothing


def test_resume_with_another_dataset(run_a, tiny_bert, sentiment_files, tmp_path):
    from conftest import make_rows, write_csv

    out = _copy(run_a, tmp_path)
    other = write_csv(tmp_path / "other.csv", make_rows(32, 9))  # same labels, other rows
    assert_refused(_args(tiny_bert, {**sentiment_files, "train_file": str(other)}, out,
                         resume_from_checkpoint="latest"), "resume_from_checkpoint", "training data")


def test_resume_on_another_world_size(run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"),
                   "resume_from_checkpoint", "saved by 1 rank(s), this job has 2", env=env)


@pytest.mark.parametrize("damage,needle,kind", [("delete", "optimizer shard of rank 0", "optim"),
                                                ("empty", "is empty (0 bytes)", "optim"),
                                                ("delete", "model states of rank 0", "model")])  # issue 34 item 3
def test_resume_with_a_missing_shard(damage, needle, kind, run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    shard = next((out / "checkpoints" / "step4").glob(f"*{kind}_states.pt"))
    shard.unlink() if damage == "delete" else shard.write_bytes(b"")
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"),
                   "resume_from_checkpoint", needle)


def test_resume_prunes_only_its_own_and_survives_a_malformed_marker(run_a, tiny_bert, sentiment_files, tmp_path):
    out = _copy(run_a, tmp_path)
    ckpts = out / "checkpoints"
    foreign = ckpts / "step100"
    shutil.copytree(ckpts / "step2", foreign)  # a complete checkpoint of another run, newer than ours
    marker = json.loads((foreign / "infoprompt_complete.json").read_text())
    marker["global_step"], marker["run"]["run_uid"] = 100, "another-run"
    (foreign / "infoprompt_complete.json").write_text(json.dumps(marker))
    (ckpts / "step999").mkdir()
    (ckpts / "step999" / "infoprompt_complete.json").write_text("{not json")  # item 6
    r = run_cli(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest", max_steps=8))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "metrics.json").is_file()
    own = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step"))
    assert own == ["step100", "step6", "step8", "step999"], own  # step2/step4 pruned, the others untouched
    assert (ckpts / "latest").read_text().strip() == "step8"


def test_exploding_loss_stops_with_exit_3(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "run"
    r = run_cli(_args(tiny_bert, sentiment_files, out, learning_rate=1e9, max_steps=40, save_steps=0,
                      max_nonfinite_steps=3))
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 3, r.stderr[-3000:]
    assert len(lines) == 1 and "training diverged" in lines[0], lines
    assert not (out / "metrics.json").exists()
