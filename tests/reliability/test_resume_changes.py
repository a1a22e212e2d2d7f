"""Issue 34, items 6 and 7: a resume that used to do something else without a word. A checkpoint past a
smaller --max_steps is refused; a DeepSpeed json edited since the start is named in one warning line; a bf16
run resumed as fp32 is refused (not converted) in one line. Real trainings make the checkpoints (tiny BERT,
2 steps, fp32 and bf16); the resumes run through pre-flight in process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, tiny_args
from reliability_lib import assert_refused, prepare_in_process, record_case

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "resume_changes")


def _args(tiny_bert, files, out: Path, **over):
    return tiny_args(tiny_bert, files, out, **{"max_steps": 2, "save_steps": 2, "eval_steps": 1000, **over})


def _trained(tiny_bert, files, tmp_path_factory, **over) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    r = run_cli(_args(tiny_bert, files, out, **over))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fp32_run(tiny_bert, sentiment_files, tmp_path_factory) -> Path:
    return _trained(tiny_bert, sentiment_files, tmp_path_factory)


@pytest.fixture(scope="module")
def bf16_run(tiny_bert, sentiment_files, tmp_path_factory) -> Path:
    return _trained(tiny_bert, sentiment_files, tmp_path_factory, bf16="true")


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / ".infoprompt.lock").unlink(missing_ok=True)
    return out


def test_resume_past_a_smaller_max_steps_is_refused(fp32_run, tiny_bert, sentiment_files, tmp_path):
    out = _copy(fp32_run, tmp_path)
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest", max_steps=1),
                   "max_steps", "is at step 2, past this run's last step 1")
    # the same step count is no mistake: a run killed after its last save resumes to finish
    code, lines, _ = prepare_in_process(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest"))
    assert code == "accepted", lines


def test_an_edited_deepspeed_json_on_resume_is_named(fp32_run, tiny_bert, sentiment_files, tmp_path):
    out = _copy(fp32_run, tmp_path)
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["gradient_clipping"] = 0.25
    (tmp_path / "edited.json").write_text(json.dumps(ds))
    code, lines, stdout = prepare_in_process(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest",
                                                   max_steps=4, deepspeed=str(tmp_path / "edited.json")))
    assert code == "accepted", lines
    warned = [ln for ln in stdout.splitlines() if ln.startswith("warning: deepspeed: ")]
    assert len(warned) == 1 and "gradient_clipping: 1.0 -> 0.25" in warned[0], stdout
    assert "total_num_steps" not in warned[0]  # a longer run (max_steps 2 -> 4) is not an edit
    code, _, stdout = prepare_in_process(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest",
                                               max_steps=4))
    assert code == "accepted" and "warning: deepspeed" not in stdout


def test_a_bf16_run_resumed_as_fp32_is_refused(bf16_run, tiny_bert, sentiment_files, tmp_path):
    out = _copy(bf16_run, tmp_path)
    assert_refused(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest", max_steps=4),
                   "bf16", "saved by a bf16 run, this run is fp32: a change of precision is refused, not converted")
    code, lines, _ = prepare_in_process(_args(tiny_bert, sentiment_files, out, resume_from_checkpoint="latest",
                                              max_steps=4, bf16="true"))
    assert code == "accepted", lines
