"""Bad input that used to get past pre-flight (issue 15): each case must now end in pre-flight, before any
weight loads, with one line `error: <field>: ...` and exit code 2. In process, through `cli.train_main`
with the run cut after `prepare` (reliability_lib.prepare_in_process); the divergence case is a real run
in test_outdir_and_resume.py, its loss guard a pure function here."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_args
from reliability_lib import assert_refused, prepare_in_process, record_case

pytestmark = pytest.mark.reliability

@pytest.fixture(autouse=True)
def _count(request):
    yield
    record_case(request, "preflight")


def _ds_json(tmp_path: Path, **changes) -> str:
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    for path, value in changes.items():
        node = ds
        *parents, last = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    return str(tmp_path / "ds.json")


def args(tiny_bert, sentiment_files, tmp_path, **over):
    return tiny_args(tiny_bert, sentiment_files, tmp_path / "run", **over)


def test_ds_json_bf16_disagrees_with_flag(tiny_bert, sentiment_files, tmp_path):
    ds = _ds_json(tmp_path, bf16__enabled=True)
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, deepspeed=ds, bf16="false"), "bf16", "bf16.enabled=true")


@pytest.mark.parametrize("how", ["flag", "json"])
def test_fp16_on_cpu(how, tiny_bert, sentiment_files, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on a GPU")
    over = {"fp16": "true"} if how == "flag" else {"deepspeed": _ds_json(tmp_path, fp16__enabled=True), "fp16": "true"}
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, **over), "fp16", "GPU")


def test_lamb_on_cpu(tiny_bert, sentiment_files, tmp_path):
    ds = _ds_json(tmp_path, optimizer={"type": "Lamb", "params": {"lr": "auto"}})
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, deepspeed=ds), "deepspeed", "Lamb")


def test_nvme_offload_without_path(tiny_bert, sentiment_files, tmp_path):
    ds = _ds_json(tmp_path, zero_optimization__offload_optimizer={"device": "nvme"})
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, deepspeed=ds), "deepspeed", "nvme_path")


def test_output_dir_empty(tiny_bert, sentiment_files, tmp_path):
    argv = args(tiny_bert, sentiment_files, tmp_path)
    argv[argv.index("--output_dir") + 1] = ""
    assert_refused(argv, "output_dir", "empty")


def test_output_dir_under_a_file(tiny_bert, sentiment_files, tmp_path):
    (tmp_path / "afile").write_text("x")
    argv = tiny_args(tiny_bert, sentiment_files, tmp_path / "afile" / "run")
    assert_refused(argv, "output_dir", "is a file")


def test_output_dir_read_only(tiny_bert, sentiment_files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; the check creates a file, which catches a read-only mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_refused(tiny_args(tiny_bert, sentiment_files, ro / "run"), "output_dir", "cannot write")
    finally:
        ro.chmod(0o755)


def test_model_path_is_a_file(tiny_bert, sentiment_files, tmp_path):
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, model_name_or_path=str(Path(tiny_bert) / "config.json")),
                   "model_name_or_path", "is a file")


def test_model_folder_without_tokenizer(tiny_bert, sentiment_files, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(tiny_bert).iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, model_name_or_path=str(bare)),
                   "model_name_or_path", "no tokenizer files")


def test_blank_prompt_init_text(tiny_bert, sentiment_files, tmp_path):
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, prompt_init="text", prompt_init_text=" "),
                   "prompt_init_text")


def test_max_length_below_special_tokens(tiny_bert, sentiment_files, tmp_path):
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, max_length=1), "max_length", "special tokens")


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "2"}])
def test_stray_launcher_variables(env, tiny_bert, sentiment_files, tmp_path):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        os.environ.pop(v, None)  # conftest restores the environment afterwards
    assert_refused(args(tiny_bert, sentiment_files, tmp_path), "environment", env=env)


def test_empty_label_word(tiny_bert, sentiment_files, tmp_path):
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, label_words='{"pos": "", "neg": "bad"}'),
                   "label_words", "empty")


def test_label_words_all_unknown_warns(tiny_bert, sentiment_files, tmp_path):
    # a warning, not an error: presets' words may be missing from a small vocabulary (tests/test_tasks.py)
    code, lines, out = prepare_in_process(args(tiny_bert, sentiment_files, tmp_path, label_words="pos=zyzzyva,neg=quokka"))
    assert code == "accepted", lines
    assert "warning: label_words: every label word is unknown to the tokenizer" in out


def test_some_label_words_unknown_warns(tiny_bert, sentiment_files, tmp_path):
    code, lines, out = prepare_in_process(args(tiny_bert, sentiment_files, tmp_path, label_words="pos=good,neg=quokka"))
    assert code == "accepted", lines
    assert "warning: label_words: neg=quokka" in out


def test_tilde_output_dir_in_yaml_is_expanded(tmp_path):
    from infoprompt_ds.config_load import parse_config

    (tmp_path / "run.yaml").write_text("output_dir: ~/infoprompt_x\n")
    assert parse_config(["--config", str(tmp_path / "run.yaml")]).output_dir == os.path.expanduser("~/infoprompt_x")


@pytest.mark.parametrize("name,text", [("run.yaml", "seed: 1\nmethod: prompt\nseed: 2\n"),
                                       ("run.json", '{"seed": 1, "seed": 2}')])
def test_duplicate_config_key(name, text, tiny_bert, sentiment_files, tmp_path):
    (tmp_path / name).write_text(text)
    assert_refused(["--config", str(tmp_path / name)] + args(tiny_bert, sentiment_files, tmp_path), "config",
                   "'seed' is given twice")


def test_toml_config_is_parsed_as_toml(tmp_path):
    from infoprompt_ds.config_load import parse_config

    (tmp_path / "run.toml").write_text('method = "prompt"\nseed = 7\n')
    cfg = parse_config(["--config", str(tmp_path / "run.toml")])
    assert (cfg.method, cfg.seed) == ("prompt", 7)


def test_unknown_config_suffix(tiny_bert, sentiment_files, tmp_path):
    (tmp_path / "run.cfg").write_text('{"seed": 1}')
    assert_refused(["--config", str(tmp_path / "run.cfg")] + args(tiny_bert, sentiment_files, tmp_path), "config",
                   "unknown format")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_uncached_hub_name_fails_fast(env, tiny_bert, sentiment_files, tmp_path):
    t0 = time.perf_counter()
    env = {**env, "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    assert_refused(args(tiny_bert, sentiment_files, tmp_path, model_name_or_path="some-org/no-such-model"),
                   "model_name_or_path", "Hugging Face cache", env=env)
    assert time.perf_counter() - t0 < 20  # generous on a loaded machine; the hub client's retries took 26 s


def test_exploded_loss_counts_as_divergence():
    from infoprompt_ds.runtime.loss_guard import LossGuard

    g = LossGuard()
    assert g.ok(0.69) and g.ok(5.0) and g.ok(1e3)
    assert not g.ok(4.6e20) and not g.ok(float("nan")) and not g.ok(float("inf"))
