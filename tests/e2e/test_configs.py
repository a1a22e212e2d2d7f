"""Every example in configs/ parses and starts: the file as a user copies it, with only the backbone,
the data files and the length of the run overridden on the command line (a tiny model, 1 step)."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from infoprompt_ds.config import TrainConfig
from infoprompt_ds.config_load import parse_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FIELDS = set(TrainConfig.__dataclass_fields__)


def test_every_config_starts_with_the_command_that_runs_it():
    assert len(CONFIGS) >= 4
    for path in CONFIGS:
        head = path.read_text().split("\n\n")[0]
        assert f"train.py --deepspeed ds_configs/zero3.json --config configs/{path.name}" in head, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path):
    assert set(yaml.safe_load(path.read_text())) <= FIELDS  # every key is a field of this version
    cfg = parse_config(["--config", str(path)])
    assert cfg.output_dir.startswith("outputs/")


def ner_files(d: Path) -> dict[str, str]:
    sent = "the X O\ngood X B-per\nfilm X I-per\nwas X O\nbad X O\n\n"
    for split in ("train", "validation", "test"):
        (d / f"{split}.conll").write_text(sent * 40)
    return {f"{s}_file": str(d / f"{s}.conll") for s in ("train", "validation", "test")}


def rte_files(d: Path) -> dict[str, str]:
    rows = ["sentence1\tsentence2\tlabel"] + [
        f"the film was {w}\tit was {w if i % 2 else 'bad'}\t{'entailment' if i % 2 else 'not_entailment'}"
        for i, w in enumerate(["good", "fine", "nice", "great"] * 20)]
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text("\n".join(rows))
    return {"train_file": str(d / "train.tsv"), "test_file": str(d / "dev.tsv")}


@pytest.mark.e2e
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_starts(path, tmp_path, tiny_bert, tiny_llama_lm):
    # the decoder example asks readout=lm_label: a causal LM checkpoint (with its LM head)
    over = {"model_name_or_path": tiny_llama_lm if "decoder" in path.stem else tiny_bert,
            "output_dir": str(tmp_path / "out"), "max_steps": 1, "eval_steps": 1, "logging_steps": 1,
            "n_virtual_tokens": 4, "max_length": 24, "k_shot": 8, "per_device_eval_batch_size": 64}
    text = path.read_text()
    if "task_type: ner" in text:
        over.update(ner_files(tmp_path), k_shot="none")
    elif "glue/rte" in text:
        over.update(rte_files(tmp_path))
    args = ["--config", str(path), "--deepspeed", "zero3"] + [x for k, v in over.items() for x in (f"--{k}", str(v))]
    proc = run_cli(args)  # MLflow: the default sqlite store beside output_dir (tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test"]
    # a static prompt's export carries the PEFT adapter too
    assert (tmp_path / "out" / "export" / "adapter_config.json").is_file()
