"""The persistent z(x, no prompt) cache through real runs: they write it, hit it across seeds and
compute only the misses, the cached rows equal a fresh forward, a truncated file is recomputed, and 2
ranks agree on the hits. The in-process checks are in tests/unit/test_unprompted_cache.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_in_process, run_cli, tiny_args
from infoprompt_ds.runtime import unprompted_cache as uc
from infoprompt_ds.config_load import parse_config


HITS = re.compile(r"\[cache\] z\(x, no prompt\): (\d+)/(\d+) hits from (\S+)")


def _train_split(model_dir, files, out, **over):
    from infoprompt_ds.data.load import prepare_data
    from infoprompt_ds.method.model import load_tokenizer

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
    _, _, model = build_in_process(model_dir, files, tmp_path / "m")
    model.eval()
    with torch.no_grad():
        for ex in train:
            t = {name: torch.tensor([ex[name]]) for name in ("input_ids", "attention_mask", "token_type_ids") if name in ex}
            fresh = model.unprompted(t["input_ids"], t["attention_mask"], t.get("token_type_ids"))[0]
            row = stored[uc.example_key(ex)]
            assert torch.allclose(row, fresh, atol=1e-6), (row - fresh).abs().max()


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


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
    from infoprompt_ds.env import free_port

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

