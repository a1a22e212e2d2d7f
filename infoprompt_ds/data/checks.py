"""Checks of a local classification file before `datasets` reads it, so that a bad file fails with its
name, line and cause instead of "An error occurred while generating the dataset": encodings other than
UTF-8, a TSV named .csv, a header with a duplicate or space-padded column, a broken or nested JSON line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Optional

from infoprompt_ds.config import ConfigError

_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _decode(path: Path, field_name: str) -> str:
    raw = path.read_bytes()
    for bom, name in _BOMS.items():
        if raw.startswith(bom):
            raise ConfigError(field_name, f"{path} is {name} text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(field_name, f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8 "
                          f"(it may be latin-1 or cp1252)")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def _check_record(rec, where: str, field_name: str, columns: Iterable[str]) -> None:
    if not isinstance(rec, dict):
        raise ConfigError(field_name, f"{where}: expected a JSON object (one record), got {type(rec).__name__}")
    for col in columns:
        value = rec.get(col)
        if isinstance(value, (dict, list)):
            raise ConfigError(field_name, f"{where}: {col!r} is a nested JSON {'object' if isinstance(value, dict) else 'list'}; "
                              f"expected text or a number")


_COLUMN_FLAGS = ("text_column", "text_pair_column", "label_column")


def _check_names(where: str, found: list[str], columns: list[Optional[str]]) -> None:
    """Every missing column in one line, with the columns found and the flags that map them: one round trip.
    The error names the first missing column's flag (the field to fix), the message names the file."""
    missing = [(flag, col) for flag, col in zip(_COLUMN_FLAGS, columns) if col and col not in found]
    if missing:
        expected = ", ".join(f"{col!r} (--{flag})" for flag, col in zip(_COLUMN_FLAGS, columns) if col)
        fix = " ".join(f"--{flag} <column>" for flag, _ in missing)
        raise ConfigError(missing[0][0], f"{where}: no column {' or '.join(repr(c) for _, c in missing)}; found "
                          f"{', '.join(map(repr, found)) or 'none'}; expected {expected}; map them with {fix}")


def check_classification_file(path: str, field_name: str, columns: list[Optional[str]]) -> None:
    """columns: the text, text-pair and label column names (None: unused)."""
    p = Path(path)
    text = _decode(p, field_name)
    cols = [c for c in columns if c]
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        header = text.split("\n", 1)[0].rstrip("\r")
        if suffix == ".csv" and "," not in header and "\t" in header:
            raise ConfigError(field_name, f"{p}:1: the header is tab-separated; name the file .tsv (or use commas)")
        names = next(csv.reader(io.StringIO(header), delimiter="\t" if suffix == ".tsv" else ","), [])
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(field_name, f"{p}:1: column {name!r} appears twice in the header; rename one")
            if name != name.strip():
                raise ConfigError(field_name, f"{p}:1: header column {name!r} has surrounding spaces; remove them")
        _check_names(f"{p}:1", names, columns)
    elif suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except ValueError as e:
                raise ConfigError(field_name, f"{p}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})")
            _check_record(rec, f"{p}:{lineno}", field_name, cols)
            if lineno == 1:
                _check_names(f"{p}:1", list(rec), columns)
    elif suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise ConfigError(field_name, f"{p}:{e.lineno}: not valid JSON ({e.msg})")
        except ValueError as e:
            raise ConfigError(field_name, f"{p}: {e}")
        if isinstance(data, list):
            for i, rec in enumerate(data):
                _check_record(rec, f"{p}: record {i}", field_name, cols)
        elif isinstance(data, dict):  # read as one row: "the train split has 1 row(s)" named no cause
            nested = next((k for k, v in data.items() if isinstance(v, list) and v
                           and all(isinstance(r, dict) for r in v)), None)
            if nested is not None:
                raise ConfigError(field_name, f"{p}: the records are nested under the key {nested!r}, not at the top "
                                  f"level; give a JSON list of records or JSON lines (jq -c '.{nested}[]' {p.name})")


def check_texts_not_all_empty(ds, text_column: str, field_name: str) -> None:
    """A train split whose texts are all empty trained at chance and exited 0 (issue 34 item 6)."""
    train = ds["train"]
    if text_column in train.column_names and all(not str(t or "").strip() for t in train[text_column]):
        raise ConfigError(field_name, f"every text of the train split (column {text_column!r}, {len(train)} rows) "
                          f"is empty; check --text_column and the file")


def warn_shared_files(files: dict[str, tuple[str, str]]) -> None:
    """The same file (or the same bytes) as two splits: the test or validation score would be measured on
    training examples (issue 34 item 6). A warning: a smoke run may do it on purpose."""
    import os

    from infoprompt_ds.backbone import file_sha256 as digest

    sizes = [Path(f).stat().st_size for _, f in files.values()]
    seen: dict[str, str] = {}
    for (split_name, (field_name, f)), size in zip(files.items(), sizes):
        if sizes.count(size) < 2:
            continue  # no other file of that size: not the same bytes, and not worth hashing
        key = digest(f)
        if key in seen and os.environ.get("RANK", "0") == "0":
            print(f"warning: {field_name}: {f} holds the same data as the {seen[key]} file; its scores will be "
                  f"measured on examples the model saw (data leakage); give separate files", flush=True)
        seen.setdefault(key, split_name)


def check_label_forms(parts: dict, files: dict[str, tuple[str, str]], label_column: str,
                      labels: Optional[list[str]]) -> None:
    """Integer ids in one split and names in another cannot both be right (without --labels to map ids)."""
    if labels is not None:
        return
    kinds = {}
    for split, part in parts.items():
        if label_column in part.column_names:
            dtype = str(part.features[label_column].dtype) if hasattr(part.features[label_column], "dtype") else ""
            kinds[split] = "ids" if dtype.startswith(("int", "uint")) else "names"
    if len(set(kinds.values())) > 1:
        ids = next(s for s, k in kinds.items() if k == "ids")
        names = next(s for s, k in kinds.items() if k == "names")
        raise ConfigError("labels", f"labels are integer ids in {files[ids][1]} but names in {files[names][1]}; use one "
                          f"form, or pass --labels name0,name1,... to name the ids")


def root_cause(e: BaseException) -> BaseException:
    """`datasets` wraps a reader's error in "An error occurred while generating the dataset": the cause is
    the useful part."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e
