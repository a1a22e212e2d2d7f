"""The persistent z(x, no prompt) cache (`--unprompted_cache_dir`): what its key covers, that real runs
write it, hit it across seeds and compute only the misses, that the cached rows equal a fresh forward,
that a damaged file is replaced instead of trusted, and that 2 ranks agree on the hits."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli, tiny_args
from infoprompt_ds import unprompted_cache as uc
from infoprompt_ds.config import ConfigError, parse_config

HITS = re.compile(r"\[cache\] z\(x, no prompt\): (\d+)/(\d+) hits from (\S+)")


def _built(model_dir: str, files: dict, out: Path, **over):
    """(cfg, tokenizer, InfoPromptModel) in this process, as a run builds them (fp32, no DeepSpeed)."""
    from infoprompt_ds.model import build_model, load_model_config, load_tokenizer

    cfg = parse_config(tiny_args(model_dir, files, out, **over))
    tok = load_tokenizer(cfg)
    return cfg, tok, build_model(cfg, load_model_config(cfg), tok, ["neg", "pos"], torch.float32)


def _key(model_dir, files, tmp_path, device="cpu", **over) -> str:
    cfg, tok, model = _built(model_dir, files, tmp_path / "k", **over)
    return uc.backbone_key(cfg, model, tok, device)


def _train_split(model_dir, files, out, **over):
    from infoprompt_ds.data import prepare_data
    from infoprompt_ds.model import load_tokenizer

    cfg = parse_config(tiny_args(model_dir, files, out, **over))
    return prepare_data(cfg, load_tokenizer(cfg)).splits["train"]


def _read(path: Path) -> dict[bytes, torch.Tensor]:
    return uc.load_cache(path, path.stem, 32)


def _hits(proc) -> tuple[int, int, Path]:
    found = HITS.findall(proc.stdout)
    assert len(found) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return int(found[0][0]), int(found[0][1]), Path(found[0][2])


def _assert_fresh(stored: dict, train, model_dir, files, tmp_path):
    """Each example's cached row equals z(x, no prompt) from a fresh, unbatched fp32 forward."""
    _, _, model = _built(model_dir, files, tmp_path / "m")
    model.eval()
    with torch.no_grad():
        for ex in train:
            t = {name: torch.tensor([ex[name]]) for name in ("input_ids", "attention_mask", "token_type_ids") if name in ex}
            fresh = model.unprompted(t["input_ids"], t["attention_mask"], t.get("token_type_ids"))[0]
            row = stored[uc.example_key(ex)]
            assert torch.allclose(row, fresh, atol=1e-6), (row - fresh).abs().max()


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# --- the key -------------------------------------------------------------------------------------------

def test_backbone_key_covers_what_z_depends_on(tiny_bert, sentiment_files, tmp_path):
    model = tmp_path / "bert"
    shutil.copytree(tiny_bert, model)  # its files are edited below
    m = str(model)
    base = _key(m, sentiment_files, tmp_path)
    assert base == _key(m, sentiment_files, tmp_path)  # stable: a fresh load gives the same key
    cfg, tok, built = _built(m, sentiment_files, tmp_path / "k")
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


# --- real runs ---------------------------------------------------------------------------------------

RUN = dict(k_shot=16, max_steps=2, eval_steps=2, logging_steps=1)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_bert, sentiment_files):
    """Seed 1, 16 of the 32 training examples per class, into an empty cache."""
    root = tmp_path_factory.mktemp("zcache")
    cache = root / "cache"
    proc = run_cli(tiny_args(tiny_bert, sentiment_files, root / "seed1", seed=1, unprompted_cache_dir=cache, **RUN))
    _ok(proc)
    return root, cache, proc


def test_first_run_writes_every_training_example(first_run, tiny_bert, sentiment_files):
    root, cache, proc = first_run
    hits, n, path = _hits(proc)
    assert (hits, n) == (0, 32) and path.parent == cache and path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]
    train = _train_split(tiny_bert, sentiment_files, root / "x", seed=1, **RUN)
    assert set(_read(path)) == {uc.example_key(ex) for ex in train}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the metadata says what the key was made from
        fields = json.loads(f.metadata()["key_fields"])
    assert fields["max_length"] == 24 and fields["pooling"] == "cls" and fields["dtype"] == "fp32"


def test_second_seed_hits_the_overlap_and_matches_a_fresh_forward(first_run, tiny_bert, sentiment_files, tmp_path):
    root, cache0, _ = first_run
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    out = root / "seed2"
    proc = run_cli(tiny_args(tiny_bert, sentiment_files, out, seed=2, unprompted_cache_dir=cache, **RUN))
    _ok(proc)
    hits, n, path = _hits(proc)
    keys1 = {uc.example_key(ex) for ex in _train_split(tiny_bert, sentiment_files, tmp_path / "a", seed=1, **RUN)}
    train2 = _train_split(tiny_bert, sentiment_files, tmp_path / "b", seed=2, **RUN)
    keys2 = [uc.example_key(ex) for ex in train2]
    overlap = len(set(keys2) & keys1)
    assert n == 32 and hits == overlap and 0 < overlap < 32, (hits, overlap)
    assert f"({n - hits} computed;" in proc.stdout  # only the misses went through the backbone
    stored = _read(path)
    assert set(stored) == keys1 | set(keys2)

    # The MLflow run records the hits (a metric) and the key (a tag).
    import mlflow

    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["train/unprompted_cache_hits"] == hits
    assert run.data.tags["unprompted_cache.key"] == path.stem
    assert run.data.params["unprompted_cache_dir"] == str(cache)

    # Every cached row (hits from seed 1's run, misses from this one) equals a fresh unbatched forward.
    _assert_fresh(stored, train2, tiny_bert, sentiment_files, tmp_path)


def test_truncated_cache_is_recomputed_and_rewritten(first_run, tmp_path):
    root, cache0, proc0 = first_run
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    (path,) = cache.iterdir()
    good = _read(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    args = [a if a != str(cache0) else str(cache) for a in proc0.args[2:]]  # seed 1's run, this cache
    args[args.index(str(root / "seed1"))] = str(tmp_path / "again")
    proc = run_cli(args)
    _ok(proc)
    assert proc.stderr.count("ignoring unreadable cache file") == 1, proc.stderr[-3000:]
    assert _hits(proc)[:2] == (0, 32)
    again = _read(path)
    assert set(again) == set(good) and all(torch.allclose(again[k], good[k], atol=1e-6) for k in good)
    # and the next run finds everything: no backbone pass at all before training, which still runs
    args[args.index(str(tmp_path / "again"))] = str(tmp_path / "third")
    proc = run_cli(args)
    _ok(proc)
    assert _hits(proc)[:2] == (32, 32) and "(0 computed;" in proc.stdout and not proc.stderr.count("[cache]")
    assert (tmp_path / "third" / "metrics.json").is_file()


@pytest.mark.e2e
def test_two_ranks_agree_on_hits_from_a_warm_cache(first_run, tiny_bert, sentiment_files, tmp_path):
    """Rank 0 reads the cache and broadcasts the hits and their rows; the misses (seed 3's new examples)
    are computed sharded over both ranks; rank 0 merges them in."""
    from infoprompt_ds.tracking import free_port

    root, cache0, _ = first_run
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    before = _read(next(cache.iterdir()))
    proc = run_cli(["--deepspeed", str(ROOT / "ds_configs/zero3.json"),
                    *tiny_args(tiny_bert, sentiment_files, tmp_path / "ranks", seed=3, unprompted_cache_dir=cache,
                               **RUN)],
                   launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())])
    _ok(proc)
    hits, n, path = _hits(proc)  # printed once: by rank 0
    train3 = _train_split(tiny_bert, sentiment_files, tmp_path / "c", seed=3, **RUN)
    keys3 = {uc.example_key(ex) for ex in train3}
    assert n == 32 and 0 < hits == len(keys3 & set(before)) < 32
    assert json.loads((tmp_path / "ranks" / "metrics.json").read_text())["world_size"] == 2
    after = _read(path)  # same key as the 1-rank run: the world size is not part of it
    assert set(after) == set(before) | keys3
    assert all(torch.equal(after[k], before[k]) for k in before)  # existing rows are kept as they were
    _assert_fresh(after, train3, tiny_bert, sentiment_files, tmp_path)  # the rows the 2 ranks computed too
