"""Bad input at volume: hypothesis generates malformed flags, config files, DeepSpeed jsons and dataset
files; every one must end in exactly one line `error: <field>: ...` and exit code 2, within seconds,
with no traceback and no output directory created.

Most cases run in process through the real entry point (`cli.train_main`) with `train_loop.run`
replaced by its first half (setup_environment + prepare: every check that runs before a process group,
weights or output exist), so a case that slipped through would be reported as "accepted" instead of
starting to train; a sample of cases per kind also runs as a real `python train.py` process.

INFOPROMPT_FUZZ_EXAMPLES (default 50) sets the examples per kind; the report runs more."""

from __future__ import annotations

import io
import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, tiny_args
from reliability_lib import prepare_in_process, record, stderr_lines

pytestmark = pytest.mark.reliability

EXAMPLES = int(os.environ.get("INFOPROMPT_FUZZ_EXAMPLES", "50"))
CASE_BOUND_S = 30  # "within seconds": generous for a loaded 2-core machine; typical is well under 1 s
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
TALLY: dict[str, dict[str, int]] = {}


def check(kind: str, argv: list[str], out: Path) -> None:
    t0 = time.perf_counter()
    code, lines, _ = prepare_in_process(argv)  # the real entry point, cut after pre-flight
    seconds = time.perf_counter() - t0
    tally = TALLY.setdefault(kind, {"tried": 0, "refused": 0})
    tally["tried"] += 1
    assert code == 2, f"{kind}: not refused (exit {code!r}) for {argv[-6:]}: {lines[-5:]}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and ": " in lines[0][7:], (kind, lines)
    assert not any("Traceback" in line for line in lines)
    assert seconds < CASE_BOUND_S, (kind, seconds)
    assert not out.exists(), f"{kind}: {out} was created"
    tally["refused"] += 1


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_bert, sentiment_files):
    import datasets

    work = tmp_path_factory.mktemp("fuzz")
    cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(work / "hf_cache")  # thousands of tiny caches: keep them here
    yield {"model": tiny_bert, "files": sentiment_files, "work": work}
    datasets.config.HF_DATASETS_CACHE = cache
    record("fuzz", tally=TALLY, tried=sum(t["tried"] for t in TALLY.values()),
           refused=sum(t["refused"] for t in TALLY.values()))


_counter = iter(range(10**9))


def fresh(base) -> Path:
    d = base["work"] / f"case{next(_counter)}"
    d.mkdir()
    return d


# --- 1. flags ----------------------------------------------------------------------------------------

def _fields():
    from infoprompt_ds.config_load import _HINTS, _base_type

    return {name: _base_type(tp) for name, tp in _HINTS.items()}


INT_BAD = st.one_of(st.text(string.ascii_letters, min_size=1, max_size=6), st.just("1.5"), st.just("1e400"),
                    st.just("[1]"), st.just("true"), st.integers(2**32, 2**80).map(str))  # beyond every int field (seeds: < 2**32)
FLOAT_BAD = st.one_of(st.text(string.ascii_letters, min_size=1, max_size=6).filter(
    lambda s: s.lower() not in ("nan", "inf", "infinity")), st.sampled_from(["nan", "inf", "-inf", "1e400", "--1"]))
BOOL_BAD = st.text(string.ascii_letters + string.digits, min_size=1, max_size=6).filter(
    lambda s: s.lower() not in ("true", "false", "yes", "no", "1", "0"))
# fields whose strings are free-form, or where these inputs are valid by design
FREE = {"output_dir", "run_name", "mlflow_experiment", "prompt_init_text", "dataset_config_name", "local_rank",
        "text_pair_column", "no_relation_label", "task", "deepspeed", "resume_from_checkpoint", "labels",
        "label_words", "entity_markers", "dataset", "train_file", "validation_file", "test_file",
        "model_name_or_path", "text_column", "label_column", "max_eval_samples"}


CHOICES = {"method", "prompt_init", "pooling", "metric_for_best_model", "task_type", "relation_pooling"}
VALID_WORDS = {"infoprompt", "prompt", "probe", "random", "vocab", "text", "labels", "auto", "cls", "last", "mean",
               "accuracy", "macro_f1", "mcc", "f1", "relation_f1", "entity_f1", "classification", "relation", "ner",
               "markers", "pooled"}
NEGATIVE_OK = {"max_steps"}  # -1: use num_train_epochs
ZERO_OK = {"seed", "split_seed", "warmup_steps", "save_steps"}


@st.composite
def bad_flag(draw):
    fields = _fields()
    name = draw(st.sampled_from(sorted(n for n, t in fields.items() if n not in FREE and t in (int, float, bool)
                                       or n in CHOICES)))
    tp = fields[name]
    if tp is bool:
        return name, draw(BOOL_BAD)
    if tp is int:
        below = None if name in NEGATIVE_OK else st.integers(-10**6, -1 if name in ZERO_OK else 0).map(str)
        return name, draw(st.one_of(INT_BAD, below) if below is not None else INT_BAD)
    if tp is float:
        return name, draw(st.one_of(FLOAT_BAD, st.floats(-1e6, -1e-6).map(repr)))
    return name, draw(st.text(string.ascii_letters + "_-", min_size=1, max_size=12).filter(
        lambda s: s not in VALID_WORDS))


@given(case=st.one_of(bad_flag(), st.tuples(st.text(string.ascii_lowercase + "_", min_size=3, max_size=16)
                                                .filter(lambda s: s not in _fields() and s != "config"),
                                                st.just("1"))))
@SETTINGS
def test_fuzz_flags(base, case):
    name, value = case
    out = fresh(base) / "out"
    check("flags", tiny_args(base["model"], base["files"], out, **{name: value}), out)


# --- 2. config files ---------------------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def bad_config_file(draw):
    fields = _fields()
    kind = draw(st.sampled_from(["syntax", "top_level", "unknown_key", "wrong_type", "encoding", "binary"]))
    ext = draw(st.sampled_from([".yaml", ".json"]))
    if kind == "syntax":
        body = draw(st.sampled_from(['{"seed": 1', "seed: [1, 2", "a: b: c", '{"x": }', "- : -\n\t- x"])).encode()
    elif kind == "top_level":
        body = json.dumps(draw(st.one_of(st.lists(st.integers(), min_size=1, max_size=3), st.integers(),
                                         st.text(string.ascii_letters, min_size=1, max_size=5)))).encode()
    elif kind == "unknown_key":
        key = draw(st.text(string.ascii_lowercase + "_", min_size=2, max_size=12).filter(lambda s: s not in fields))
        body = json.dumps({key: 1}).encode()
    elif kind == "wrong_type":
        name = draw(st.sampled_from(sorted(n for n, t in fields.items() if t in (int, float, bool))))
        value = draw(st.one_of(st.lists(st.integers(), min_size=1, max_size=3),
                               st.dictionaries(st.text(min_size=1, max_size=3), st.integers(), min_size=1, max_size=2),
                               st.text(string.ascii_letters, min_size=2, max_size=6).filter(
                                   lambda s: s.lower() not in ("true", "false", "yes", "no", "nan", "inf", "none",
                                                               "null"))))
        body = json.dumps({name: value}).encode()
    elif kind == "encoding":
        body = draw(st.sampled_from(["seed: 1\nrun_name: caf\u00e9\n".encode("latin-1"),
                                     '{"seed": 1}'.encode("utf-16"), b"\xff\xfe\x00\x00seed: 1"]))
    else:  # a NUL byte is never valid YAML or JSON text
        body = draw(st.binary(max_size=32)) + b"\x00" + draw(st.binary(max_size=32))
    return kind, ext, body


@given(case=bad_config_file())
@SETTINGS
def test_fuzz_config_files(base, case):
    kind, ext, body = case
    d = fresh(base)
    (d / f"run{ext}").write_bytes(body)
    out = d / "out"
    check("config_files", ["--config", str(d / f"run{ext}")] + tiny_args(base["model"], base["files"], out), out)


# --- 3. DeepSpeed jsons ------------------------------------------------------------------------------

@st.composite
def bad_ds_json(draw):
    kind = draw(st.sampled_from(["syntax", "not_object", "stage", "zero_not_object", "batch_mismatch",
                                 "auto_unsupported", "wrong_type", "encoding", "empty"]))
    good = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    if kind == "syntax":
        return draw(st.sampled_from([b'{"zero_optimization": {"stage": 3,', b"{'a': 1}", b"[", b"{]"]))
    if kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=4),
                                         st.none()))).encode()
    if kind == "empty":
        return draw(st.sampled_from([b"", b"   \n"]))
    if kind == "encoding":
        return draw(st.sampled_from([json.dumps(good).encode("utf-16"), b'{"x": "\xe9"}']))
    if kind == "stage":
        good["zero_optimization"]["stage"] = draw(st.one_of(st.integers(4, 10**6), st.integers(-10**6, -1),
                                                            st.text(max_size=3), st.none(), st.floats(0.1, 2.9)))
    elif kind == "zero_not_object":
        good["zero_optimization"] = draw(st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)))
    elif kind == "batch_mismatch":
        key = draw(st.sampled_from(["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"]))
        good[key] = draw(st.integers(10**3, 10**9))
    elif kind == "auto_unsupported":
        good[draw(st.sampled_from(["steps_per_print", "prescale_gradients", "wall_clock_breakdown"]))] = "auto"
    else:  # a known key given a value of the wrong type
        path = draw(st.sampled_from([("gradient_clipping",), ("optimizer", "params", "lr"), ("bf16", "enabled"),
                                     ("scheduler", "params", "warmup_num_steps"), ("optimizer", "type"),
                                     ("scheduler", "type"), ("zero_optimization", "offload_param"),
                                     ("train_micro_batch_size_per_gpu",)]))
        node = good
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = draw(st.one_of(st.text(string.ascii_letters, min_size=1, max_size=5).filter(
            lambda s: s.lower() not in ("auto", "true", "false", "adam", "adamw", "sgd")), st.lists(st.integers(), min_size=1, max_size=2)))
    return json.dumps(good).encode()


@given(body=bad_ds_json())
@SETTINGS
def test_fuzz_deepspeed_json(base, body):
    d = fresh(base)
    (d / "ds.json").write_bytes(body)
    out = d / "out"
    check("deepspeed_json", ["--deepspeed", str(d / "ds.json")] + tiny_args(base["model"], base["files"], out), out)


# --- 4. dataset files --------------------------------------------------------------------------------

ROWS = [("good film", "pos"), ("awful plot", "neg"), ("nice story", "pos"), ("sad scene", "neg")] * 4


@st.composite
def bad_dataset(draw):
    kind = draw(st.sampled_from(["empty", "header_only", "encoding", "binary", "missing_column", "unknown_label",
                                 "null_label", "ragged_csv", "bad_jsonl", "json_not_records", "one_class"]))
    split = draw(st.sampled_from(["train_file", "validation_file", "test_file"]))
    ext = ".jsonl" if kind in ("bad_jsonl", "json_not_records") else draw(st.sampled_from([".csv", ".tsv"]))
    sep = "\t" if ext == ".tsv" else ","
    rows = list(ROWS)
    header = f"text{sep}label\n"
    if kind == "empty":
        body = b""
    elif kind == "header_only":
        body = header.encode()
    elif kind == "encoding":
        text = header + "".join(f"{t}{sep}{y}\n" for t, y in rows) + f"caf\u00e9 cr\u00e8me{sep}pos\n"
        body = text.encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-32"])))
    elif kind == "binary":
        body = draw(st.binary(min_size=8, max_size=200).filter(lambda b: b"\x00" in b))
    elif kind == "missing_column":
        body = (f"text{sep}{draw(st.sampled_from(['lbl', 'Label', 'y']))}\n" +
                "".join(f"{t}{sep}{y}\n" for t, y in rows)).encode()
    elif kind == "unknown_label":
        bad = draw(st.text(string.ascii_letters, min_size=1, max_size=6).filter(lambda s: s not in ("pos", "neg")))
        rows[draw(st.integers(0, len(rows) - 1))] = ("odd film", bad)
        body = (header + "".join(f"{t}{sep}{y}\n" for t, y in rows)).encode()
    elif kind == "null_label":
        rows[draw(st.integers(0, len(rows) - 1))] = ("odd film", "")
        body = (header + "".join(f"{t}{sep}{y}\n" for t, y in rows)).encode()
    elif kind == "ragged_csv":
        body = (header + "".join(f"{t}{sep}{y}\n" for t, y in rows) + f"a{sep}b{sep}c{sep}d\n").encode()
    elif kind == "bad_jsonl":
        body = ("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows) + '{"text": "x", "lab\n').encode()
    elif kind == "json_not_records":
        body = json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3)))).encode()
    else:  # one_class: a train file where every label is the same
        split = "train_file"
        body = (header + "".join(f"{t}{sep}pos\n" for t, _ in rows)).encode()
    return kind, split, ext, body


@given(case=bad_dataset())
@SETTINGS
def test_fuzz_dataset_files(base, case):
    kind, split, ext, body = case
    d = fresh(base)
    files = dict(base["files"])
    if ext != ".csv":  # all splits share one format: convert the good ones
        for k, v in files.items():
            text = Path(v).read_text()
            if ext == ".tsv":
                text = text.replace(",", "\t")
            else:
                import csv

                text = "".join(json.dumps(r) + "\n" for r in csv.DictReader(io.StringIO(text)))
            (d / f"{k}{ext}").write_text(text)
            files[k] = str(d / f"{k}{ext}")
    (d / f"bad{ext}").write_bytes(body)
    files[split] = str(d / f"bad{ext}")
    out = d / "out"
    args = tiny_args(base["model"], {}, out) + [x for k, v in files.items() for x in (f"--{k}", v)]
    check("dataset_files", args, out)


# --- 5. a sample as real processes -------------------------------------------------------------------

def test_sample_of_bad_inputs_as_real_processes(base):
    """The in-process harness must not hide anything a real process would show (a traceback from a
    thread, an exit code changed on the way out): one case of each kind through `python train.py`."""
    d = fresh(base)
    (d / "cfg.yaml").write_bytes('{"seed": 1}'.encode("utf-16"))
    (d / "ds.json").write_text('{"zero_optimization": {"stage": "three"}}')
    (d / "val.csv").write_text("text,label\ngood film,maybe\n")
    cases = [(["--config", str(d / "cfg.yaml")], "config"), (["--deepspeed", str(d / "ds.json")], "deepspeed"),
             (["--validation_file", str(d / "val.csv")], "labels"), (["--max_length", "1e400"], "max_length")]
    for i, (extra, field) in enumerate(cases):
        out = d / f"out{i}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_args(base["model"], base["files"], out),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = stderr_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}:"), (extra, lines)
        assert not out.exists()
        tally = TALLY.setdefault("real_processes", {"tried": 0, "refused": 0, "max_seconds": 0})
        tally["tried"] += 1
        tally["refused"] += 1
        tally["max_seconds"] = max(tally["max_seconds"], round(time.time() - t0, 1))
