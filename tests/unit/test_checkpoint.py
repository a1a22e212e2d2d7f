import json

import pytest
import torch

from infoprompt_ds.runtime.checkpoint import (MARKER, atomic_dir, complete_checkpoints, load_export, resolve_checkpoint, save_export)
from infoprompt_ds.config import ConfigError


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_old(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_roundtrip(tmp_path):
    tensors = {"prompt.weight": torch.randn(4, 8), "head.weight": torch.randn(2, 8).bfloat16()}
    save_export(tmp_path / "e", tensors, {"backbone": "x", "labels": ["a", "b"]})
    loaded, meta = load_export(tmp_path / "e")
    assert torch.equal(loaded["prompt.weight"], tensors["prompt.weight"]) and loaded["head.weight"].dtype == torch.float32
    assert meta["labels"] == ["a", "b"]
    with pytest.raises(ConfigError, match="not an infoprompt export"):
        load_export(tmp_path)


def test_latest_resolves_only_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        (root / f"step{step}").mkdir(parents=True)
        if complete:
            (root / f"step{step}" / MARKER).write_text(json.dumps({"global_step": step}))
    (root / "latest").write_text("step12")  # points at a save that was killed half-way
    assert resolve_checkpoint("latest", str(tmp_path)).name == "step8"
    assert [p.name for p in complete_checkpoints(root)] == ["step4", "step8"]
    with pytest.raises(ConfigError, match="resume_from_checkpoint"):
        resolve_checkpoint(str(root / "step12"), str(tmp_path))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_checkpoint("latest", str(tmp_path / "elsewhere"))
