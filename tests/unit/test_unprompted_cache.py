"""The persistent z(x, no prompt) cache (`--unprompted_cache_dir`), in process: what its key covers,
the example key, that a damaged file is replaced instead of trusted, and the config field. The runs that
write and hit it are in tests/e2e/test_unprompted_cache.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_in_process
from infoprompt_ds.runtime import unprompted_cache as uc
from infoprompt_ds.config import ConfigError
from infoprompt_ds.config_load import parse_config


def _key(model_dir, files, tmp_path, device="cpu", **over) -> str:
    cfg, tok, model = build_in_process(model_dir, files, tmp_path / "k", **over)
    return uc.backbone_key(cfg, model, tok, device)


def _read(path: Path) -> dict[bytes, torch.Tensor]:
    return uc.load_cache(path, path.stem, 32)


def test_backbone_key_covers_what_z_depends_on(tiny_bert, sentiment_files, tmp_path):
    model = tmp_path / "bert"
    shutil.copytree(tiny_bert, model)  # its files are edited below
    m = str(model)
    base = _key(m, sentiment_files, tmp_path)
    assert base == _key(m, sentiment_files, tmp_path)  # stable: a fresh load gives the same key
    cfg, tok, built = build_in_process(m, sentiment_files, tmp_path / "k")
    tok(["the movie was good"], truncation=True, max_length=7)  # a used tokenizer hashes the same
    assert uc.backbone_key(cfg, built, tok) == base
    # run-only settings do not touch z, so they share the cache
    assert _key(m, sentiment_files, tmp_path, seed=7, k_shot=4, method="infoprompt", gamma=0.5,
                n_virtual_tokens=2, output_dir=str(tmp_path / "elsewhere")) == base

    changed = {"max_length": _key(m, sentiment_files, tmp_path, max_length=16),
               "pooling": _key(m, sentiment_files, tmp_path, pooling="mean"),  # auto is cls for BERT
               "dtype": _key(m, sentiment_files, tmp_path, bf16="true"),
               "device": _key(m, sentiment_files, tmp_path, device="cuda")}
    tok_file = model / "tokenizer.json"
    spec = json.loads(tok_file.read_text())
    vocab = spec["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    tok_file.write_text(json.dumps(spec))
    changed["tokenizer file"] = _key(m, sentiment_files, tmp_path)
    tok_file.write_text(json.dumps({**spec, "model": {**spec["model"], "vocab": {
        **vocab, "good": vocab["bad"], "bad": vocab["good"]}}}))  # swapped back: the same tokenizer again
    assert _key(m, sentiment_files, tmp_path) == base
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten (same bytes even)
    changed["weights file"] = _key(m, sentiment_files, tmp_path)
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed


def test_example_key_is_the_model_inputs_only():
    a = {"input_ids": [2, 7, 3], "attention_mask": [1, 1, 1], "labels": 0, "idx": 5}
    assert uc.example_key(a) == uc.example_key({**a, "labels": 1, "idx": 9})
    assert uc.example_key(a) != uc.example_key({**a, "input_ids": [2, 8, 3]})
    assert uc.example_key(a) != uc.example_key({**a, "token_type_ids": [0, 0, 0]})
    assert uc.example_key(a) != uc.example_key({**a, "entity_pos": [1, 2]})
    assert len(uc.example_key(a)) == uc.KEY_BYTES


def test_damaged_file_is_empty_with_one_warning_then_replaced(tmp_path, capsys):
    key = "ab" * 32
    path = uc.cache_path(str(tmp_path), key)
    rows = {bytes([i]) * 32: torch.randn(32) for i in range(5)}
    assert uc.save_cache(path, key, {"format": 1}, rows, 32) == 5
    assert set(_read(path)) == set(rows)
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], b"garbage" * 10, b""):
        path.write_bytes(bad)
        assert uc.load_cache(path, key, 32) == {}
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "ignoring unreadable cache file" in err, err
        assert uc.save_cache(path, key, {"format": 1}, dict(list(rows.items())[:2]), 32) == 2
        assert capsys.readouterr().err == ""  # reported once, at load; the write just replaces it
        got = uc.load_cache(path, key, 32)
        assert set(got) == set(list(rows)[:2]) and all(torch.equal(got[k], rows[k]) for k in got)
    # a valid file that is not what its name says (another key, another width) is not trusted either
    assert uc.load_cache(path, "cd" * 32, 32) == {} and uc.load_cache(path, key, 16) == {}
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_config_field(tmp_path):
    assert parse_config([]).unprompted_cache_dir is None
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError) as e:
        parse_config(["--unprompted_cache_dir", str(not_a_dir)])
    assert e.value.field == "unprompted_cache_dir"
    # set where it cannot be used (no estimator / no caching): not an error, just unused
    assert parse_config(["--unprompted_cache_dir", str(tmp_path / "new"), "--method", "prompt"]).unprompted_cache_dir
    assert parse_config(["--unprompted_cache_dir", str(tmp_path), "--cache_unprompted", "false"]).unprompted_cache_dir

