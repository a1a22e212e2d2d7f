"""Data: load a dataset (preset, hub name or local files) with `datasets`, split, few-shot sample, tokenize.

Everything here runs before the model loads, so every bad-input error (missing file or column, label
without a label word, k_shot larger than a class) surfaces in seconds as a ConfigError naming the field.
Task families and their file formats live in tasks.py; this module turns any of them into token ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Sequence, load_dataset

from infoprompt_ds.config import ConfigError, TrainConfig, one_line
from infoprompt_ds.data.checks import (check_classification_file, check_label_forms, check_texts_not_all_empty, root_cause, warn_shared_files)
from infoprompt_ds.data import readout as readouts
from infoprompt_ds.data.readout import LINEAR, Readout
from infoprompt_ds.data.tasks import NO_RELATION, PRESETS, Task, normalise_file

LOCAL_FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
                 ".jsonl": ("json", {})}
IGNORE = -100  # label of sub-words, specials and pads in token classification (CrossEntropy's ignore_index)


@dataclass
class TaskData:
    splits: DatasetDict  # train/validation/test, tokenized: input_ids, attention_mask, labels, idx (+ entity_pos)
    task: Task           # resolved, with the class names in head-row order
    readout: Readout = LINEAR  # the resolved read-out (readout.py): its template/cue are in the token ids

    @property
    def label_names(self) -> list[str]:
        return list(self.task.labels)


def resolve_task(cfg: TrainConfig, labels: Optional[list[str]] = None) -> Task:
    """The task the config asks for: a named preset (`--dataset rotten_tomatoes`, the default, is one)
    fills task type, columns, labels, label words and metric for every field the user left at its default.
    `labels` sets the class names directly (a model built without data: tests, benchmarks); the label words
    are then cfg.label_words, the only ones that can name them (a preset's name the preset's labels)."""
    task = _resolve_task(cfg)
    if labels is None:
        return task
    return dataclasses.replace(task, labels=tuple(labels), label_words=cfg.label_words)


def _resolve_task(cfg: TrainConfig) -> Task:
    local = cfg.train_file is not None
    name = cfg.task or (cfg.dataset if cfg.dataset in PRESETS and not local else None)
    if name is None:
        task_type = "classification" if cfg.task_type == "auto" else cfg.task_type
        return Task(task_type, cfg.text_column, cfg.text_pair_column, cfg.label_column,
                    tuple(cfg.labels) if cfg.labels else None, cfg.label_words,
                    _default_metric(task_type) if cfg.metric_for_best_model == "auto" else cfg.metric_for_best_model,
                    cfg.no_relation_label)
    if name not in PRESETS:
        raise ConfigError("task", f"unknown task {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    labels = cfg.labels or p.labels
    return Task(type=p.task_type if cfg.task_type == "auto" else cfg.task_type,
                text_column=p.text_column if cfg.text_column == "text" else cfg.text_column,
                text_pair_column=cfg.text_pair_column or p.text_pair_column,
                label_column=p.label_column if cfg.label_column == "label" else cfg.label_column,
                labels=tuple(labels) if labels else None,
                label_words=cfg.label_words if cfg.label_words is not None else
                (dict(p.label_words) if p.label_words else None),
                metric=p.metric if cfg.metric_for_best_model == "auto" else cfg.metric_for_best_model,
                no_relation_label=cfg.no_relation_label)


def _default_metric(task_type: str) -> str:
    return {"classification": "accuracy", "relation": "relation_f1", "ner": "entity_f1"}[task_type]


def _load_local(files: dict[str, str], cfg: TrainConfig, task: Task) -> DatasetDict:
    """files: split -> (field name, path). Validated, normalised by task type, loaded by `load_dataset`."""
    paths = {}
    for split_name, (field_name, f) in files.items():
        p = Path(f)
        if not p.is_file():
            raise ConfigError(field_name, f"file not found: {f}")
        if p.stat().st_size == 0:
            raise ConfigError(field_name, f"{f} is empty")
        paths[split_name] = normalise_file(f, task.type, field_name, cfg.entity_markers, cfg.strict_bio,
                                           list(task.labels) if task.labels else None)
        if Path(paths[split_name]).suffix.lower() not in LOCAL_FORMATS:
            raise ConfigError(field_name, f"{f}: unsupported format for {task.type}; use csv, tsv, json or jsonl")
        if task.type == "classification":  # name, line and cause of a bad file, before `datasets` reads it
            check_classification_file(paths[split_name], field_name, list(_columns(task)))
    warn_shared_files(files)
    formats = {str(LOCAL_FORMATS[Path(p).suffix.lower()]) for p in paths.values()}
    if len(formats) > 1:
        raise ConfigError("train_file", "train/validation/test files must share one format")
    builder, kwargs = LOCAL_FORMATS[Path(next(iter(paths.values()))).suffix.lower()]
    parts = {}
    for split_name, path in paths.items():  # one split at a time: their column types may differ (ids/names)
        try:
            parts[split_name] = load_dataset(builder, data_files={split_name: path}, **kwargs)[split_name]
        except Exception as e:  # pyarrow/pandas parse errors: name the file and the cause, keep one line
            field_name, f = files[split_name]
            raise ConfigError(field_name, f"could not read {f}: {one_line(root_cause(e))}")
    if task.type == "classification":
        check_label_forms(parts, files, task.label_column, list(task.labels) if task.labels else None)
    return DatasetDict(parts)


def load_raw(cfg: TrainConfig, task: Task) -> DatasetDict:
    """The dataset's splits as shipped, before any split/sampling."""
    files = {k.replace("_file", ""): (k, getattr(cfg, k)) for k in ("train_file", "validation_file", "test_file")
             if getattr(cfg, k)}
    if files:
        if "train" not in files:
            raise ConfigError("train_file", "is required when validation_file or test_file is given")
        return _load_local(files, cfg, task)
    preset = PRESETS.get(cfg.task or cfg.dataset)
    if preset is not None and preset.local is not None and (cfg.task or cfg.dataset) in (cfg.task, cfg.dataset):
        return _load_local({"train": ("dataset", preset.local())}, cfg, task)
    if preset is not None and cfg.dataset in (cfg.task, "rotten_tomatoes"):
        name, config_name = preset.hub, preset.hub_config
    else:
        name, config_name = cfg.dataset, cfg.dataset_config_name
    if Path(name).suffix.lower() in LOCAL_FORMATS or Path(name).suffix.lower() in (".txt", ".conll") \
            or Path(name).exists():
        return _load_local({"train": ("dataset", name)}, cfg, task)
    why = _uncached_and_offline(name)
    if why:
        raise ConfigError("dataset", f"{name!r} is not a preset, a local file nor in the datasets cache, and {why}; "
                          f"give --train_file (csv/json) or run once with the hub reachable")
    try:
        raw = load_dataset(name, config_name)
    except Exception as e:
        raise ConfigError("dataset", f"could not load {name!r} (not a preset, local file or reachable hub "
                          f"dataset): {one_line(e)}")
    if preset is not None and preset.hub_test_split == "validation" and "validation" in raw:
        # GLUE/SuperGLUE hide test labels: the public validation split serves as test, and validation is
        # carved from train (what few-shot papers do).
        raw = DatasetDict({"train": raw["train"], "test": raw["validation"]})
    return raw


def _uncached_and_offline(name: str) -> Optional[str]:
    """Why a hub dataset cannot load (not cached, hub offline), else None: load_dataset printed ten retry
    lines over 32 s before its error (issue 34 item 6)."""
    from huggingface_hub import constants

    from infoprompt_ds.env import hub_unreachable

    roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
    names = (name.replace("/", "___"), "datasets--" + name.replace("/", "--"))
    for root in roots:
        if root.is_dir() and any(d.name in names or d.name.endswith("___" + name) for d in root.iterdir()):
            return None  # cached: load_dataset reads it (offline too)
    return hub_unreachable()


def split(raw: DatasetDict, cfg: TrainConfig) -> DatasetDict:
    """train/validation/test; the missing ones are carved from train with the fixed split_seed."""
    if "train" not in raw:
        raise ConfigError("dataset", f"has no train split (splits: {', '.join(raw)})")
    train = raw["train"]
    out = {}
    carve = ("test" not in raw) + ("validation" not in raw)
    if carve and len(train) < carve + 1:  # train_test_split would raise a bare ValueError
        raise ConfigError("train_file" if cfg.train_file else "dataset", f"the train split has {len(train)} row(s): "
                          f"too few to carve validation/test from; add rows or give validation_file and test_file")
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


def _columns(task: Task) -> tuple[str, Optional[str], str]:
    """(text, pair, label) column names; normalised relation/NER files use fixed names."""
    if task.type == "ner" and task.text_column == "text":
        return "tokens", None, "tags" if task.label_column == "label" else task.label_column
    return task.text_column, task.text_pair_column, task.label_column


def check_columns(ds: DatasetDict, task: Task) -> None:
    text, pair, label = _columns(task)
    for field_name, col in (("text_column", text), ("text_pair_column", pair), ("label_column", label)):
        if col is None:
            continue
        for name, part in ds.items():
            if col not in part.column_names:
                raise ConfigError(field_name, f"column {col!r} is not in the {name} split (columns: "
                                  f"{', '.join(part.column_names)}); set --{field_name}")
    for name, part in ds.items():
        if len(part) == 0:
            raise ConfigError("dataset", f"the {name} split is empty")


def _label_strings(part: Dataset, col: str, names: Optional[list[str]]) -> list:
    """Labels as strings: integer ids of a ClassLabel (or of a preset's label list) become names."""
    feature = part.features[col]
    inner = feature.feature if isinstance(feature, (Sequence, list)) and hasattr(feature, "feature") else feature
    id_names = inner.names if isinstance(inner, ClassLabel) else names

    def name(v):
        if isinstance(v, bool) or v is None:
            return None if v is None else str(v)
        if isinstance(v, (int, np.integer)) and id_names and 0 <= v < len(id_names) and str(v) not in (names or []):
            return id_names[v]
        return str(v)

    return [[name(t) for t in v] if isinstance(v, list) else name(v) for v in part[col]]


def resolve_labels(ds: DatasetDict, task: Task) -> tuple[list[str], dict[str, list]]:
    """Class names in head order (every label in every split must be one of them, and have a label word
    when a verbalizer is given), and each split's labels as strings."""
    _, _, col = _columns(task)
    declared = list(task.labels) if task.labels else None
    per_split = {name: _label_strings(part, col, declared) for name, part in ds.items()}

    def flat(values):
        return [t for v in values for t in v] if task.type == "ner" else values

    names = declared or sorted({v for v in flat(per_split["train"]) if v is not None})
    known = set(names)
    for split_name, values in per_split.items():
        for i, v in enumerate(values):
            for t in (v if task.type == "ner" else [v]):
                if t is None or t not in known:
                    raise ConfigError("labels", f"label {t!r} (row {i} of the {split_name} split) is not one of "
                                      f"{names}; fix the data or pass --labels")
    if len(names) < 2:
        raise ConfigError("labels", f"need at least 2 classes, found {names}")
    if task.label_words is not None:
        missing = [n for n in names if n not in task.label_words]
        if missing:
            raise ConfigError("label_words", f"no word for label(s) {missing}; add e.g. {missing[0]}=word")
    return names, per_split


def sample_k_shot(train: Dataset, labels: list, names: list[str], k: int, seed: int, task_type: str) -> Dataset:
    """k examples per class, chosen by a seeded generator: the same seed picks the same examples.
    NER has no per-sentence class: k * (number of tags) sentences are drawn instead."""
    rng = np.random.default_rng(seed)
    if task_type == "ner":
        n = min(len(train), k * len(names))
        return train.select(sorted(rng.choice(len(train), size=n, replace=False).tolist()))
    labels = np.array(labels)
    chosen = []
    for name in names:
        idx = np.flatnonzero(labels == name)
        if len(idx) < k:
            raise ConfigError("k_shot", f"class {name!r} has only {len(idx)} training examples; set k_shot <= "
                              f"{len(idx)} or none")
        chosen.extend(rng.choice(idx, size=k, replace=False).tolist())
    return train.select(sorted(chosen))


def encode(tokenizer, task_type: str, cfg_like, texts: list, pairs: Optional[list] = None,
           readout: Readout = LINEAR) -> dict:
    """Token ids for one batch of inputs, as training and predict both need them.

    cfg_like needs max_length and entity_markers. NER: `texts` are token lists; the returned
    `word_ids` map sub-words to words. Relation: `entity_pos` holds each entity's start-marker token.
    cloze/lm_label: the read-out's template or cue, applied on ids (readout.encode)."""
    if readout.templated:
        return readouts.encode(tokenizer, readout, texts, pairs, cfg_like.max_length)
    if task_type == "ner":
        enc = tokenizer(texts, is_split_into_words=True, truncation=True, max_length=cfg_like.max_length)
        enc["word_ids"] = [enc.word_ids(i) for i in range(len(texts))]
        return enc
    enc = tokenizer(texts, pairs, truncation=True, max_length=cfg_like.max_length)
    for i, ids in enumerate(enc["input_ids"]):
        if not ids:  # an empty text on a tokenizer that adds no specials: pooling over nothing would be NaN
            filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
            enc["input_ids"][i], enc["attention_mask"][i] = [filler], [1]
            if "token_type_ids" in enc:
                enc["token_type_ids"][i] = [0]
    if task_type == "relation":
        positions = []
        for i, text in enumerate(texts):
            row = []
            for marker in (cfg_like.entity_markers[0], cfg_like.entity_markers[2]):
                char = text.find(marker)
                tok = enc.char_to_token(i, char) if char >= 0 else None
                # A marker cut off by truncation: fall back to the last token (still a valid position).
                row.append(tok if tok is not None else len(enc["input_ids"][i]) - 1)
            positions.append(row)
        enc["entity_pos"] = positions
    return enc


def tokenize(ds: DatasetDict, labels: dict[str, list], tokenizer, cfg: TrainConfig, task: Task,
             readout: Readout = LINEAR) -> DatasetDict:
    label_id = {n: i for i, n in enumerate(task.labels)}
    text_col, pair_col, _ = _columns(task)
    ner = task.type == "ner"
    out = {}
    for split_name, part in ds.items():
        part = part.add_column("_label", labels[split_name]) if not ner else \
            part.add_column("_tags", labels[split_name])

        def fn(batch):
            texts = batch[text_col] if ner else ["" if t is None else str(t) for t in batch[text_col]]
            pairs = ["" if t is None else str(t) for t in batch[pair_col]] if pair_col else None
            enc = encode(tokenizer, task.type, cfg, texts, pairs, readout)
            if ner:
                # The head labels each word once, on its first sub-word; the rest are ignored by the loss.
                enc["labels"] = []
                for tags, words in zip(batch["_tags"], enc.pop("word_ids")):
                    row, prev = [], None
                    for w in words:
                        row.append(label_id[tags[w]] if w is not None and w != prev else IGNORE)
                        prev = w
                    enc["labels"].append(row)
            else:
                enc["labels"] = [label_id[v] for v in batch["_label"]]
            return dict(enc)

        part = part.map(fn, batched=True, remove_columns=part.column_names)
        # idx: the example's row in its split, the key of the unprompted-representation cache.
        out[split_name] = part.add_column("idx", list(range(len(part))))
    return DatasetDict(out)


def _subsample(part: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or len(part) <= n:
        return part
    return part.shuffle(seed=seed).select(range(n))


def resolve_readout(cfg: TrainConfig, task: Task, tokenizer, model_config=None) -> Readout:
    """cfg.readout (auto|cloze|lm_label|linear) for this backbone and resolved task (its labels known),
    checked against the tokenizer."""
    if model_config is None:  # callers other than the training loop: the config alone, no other check
        from transformers import AutoConfig

        from infoprompt_ds.backbone import resolve_model_path

        try:
            model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path))
        except Exception as e:
            raise ConfigError("model_name_or_path", f"cannot load {cfg.model_name_or_path!r}: {one_line(e)}")
    local = cfg.train_file is not None
    preset = PRESETS.get(cfg.task or (cfg.dataset if not local else ""))
    ro = readouts.resolve(cfg.readout, model_config, task.type, task.label_words, task.text_pair_column is not None,
                          cfg.template, cfg.cue, cfg.pooling, preset.template if preset else None,
                          preset.cue if preset else None, cfg.model_name_or_path)
    readouts.check_tokenizer(ro, tokenizer, task.words() if ro.templated else [], cfg.max_length)
    return ro


def prepare_data(cfg: TrainConfig, tokenizer, model_config=None) -> TaskData:
    """Load, split, sample and tokenize the task's data; returns it with the resolved task (the config is
    left as the user gave it) and the resolved read-out (model_config: the backbone's, for readout=auto)."""
    datasets.disable_progress_bars()
    task = resolve_task(cfg)
    ds = split(load_raw(cfg, task), cfg)
    check_columns(ds, task)
    if task.type != "ner":
        check_texts_not_all_empty(ds, _columns(task)[0], "train_file" if cfg.train_file else "dataset")
    names, labels = resolve_labels(ds, task)
    ro = resolve_readout(cfg, dataclasses.replace(task, labels=tuple(names)), tokenizer, model_config)
    train = ds["train"]
    if cfg.k_shot is not None:
        keep = sample_k_shot(train.add_column("_row", list(range(len(train)))), labels["train"], names, cfg.k_shot,
                             cfg.seed, task.type)["_row"]
        train, labels["train"] = train.select(keep), [labels["train"][i] for i in keep]
    parts = {"train": train}
    for name in ("validation", "test"):
        part = ds[name].add_column("_row", list(range(len(ds[name]))))
        part = _subsample(part, cfg.max_eval_samples, cfg.split_seed)
        labels[name] = [labels[name][i] for i in part["_row"]]
        parts[name] = part.remove_columns("_row")
    no_relation = task.no_relation_label
    if task.type == "relation" and no_relation is None:
        no_relation = next((n for n in names if n in NO_RELATION), None)
    task = dataclasses.replace(task, labels=tuple(names), no_relation_label=no_relation)
    return TaskData(tokenize(DatasetDict(parts), labels, tokenizer, cfg, task, ro), task, ro)
