"""Every example in configs/ parses and runs as written: its header command, offline, with only the length
of the run and the output folder overridden (issue 38)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli
from infoprompt_ds.env import free_port
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


def header_command(path: Path) -> list[str]:
    """The command in the file's opening comment, as a user copies it."""
    head = path.read_text().split("\n\n")[0]
    line = next(l for l in head.splitlines() if l.lstrip("# ").startswith("deepspeed train.py"))
    return shlex.split(line.lstrip("# "))


def summary_line(out: str, key: str) -> str:
    return next(l for l in out.splitlines() if l.startswith(f"{key} ")).split(None, 1)[1].strip()


def infoprompt(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command the run's summary printed, `infoprompt` as this checkout's module (no install needed)."""
    argv = shlex.split(command)
    assert argv[0] == "infoprompt", command
    return subprocess.run([sys.executable, "-m", "infoprompt_ds.cli", *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.e2e
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_as_written(path, tmp_path):
    """The header command, offline, on what the README's lines install (the shipped MiniLM, SmolLM2's GGUF,
    data/examples/), shortened to 2 steps; the run ends quietly with the summary, and its predict command
    runs as printed (and, for the default job, its compare command)."""
    cmd = header_command(path)
    assert cmd[:2] == ["deepspeed", "train.py"], cmd
    out = tmp_path / "out"
    # shortened: 2 steps, 8 examples per class, 32 to evaluate (the SmolLM2 run costs minutes on CPU otherwise)
    args = cmd[2:] + ["--max_steps", "2", "--eval_steps", "2", "--k_shot", "8", "--max_eval_samples", "32",
                      "--output_dir", str(out)]
    proc = run_cli(args, launcher=["deepspeed", "--master_port", str(free_port())])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("An input example was not provided", "Downloading artifacts", "Failed to validate serving input",
                  "Validating input example"):
        assert noise not in text, noise
    block = proc.stdout[proc.stdout.index("== done: "):]
    assert summary_line(block, "best").startswith("step ")
    assert summary_line(block, "test").split("=")[0] in json.loads((out / "metrics.json").read_text())["test"]
    run_id = summary_line(block, "MLflow").split()[1]
    assert f"runs:/{run_id}/model" in block
    # a static prompt's export carries the PEFT adapter too
    assert (out / "export" / "adapter_config.json").is_file()
    pred = infoprompt(summary_line(block, "predict"), tmp_path)
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert "label" in json.loads(pred.stdout.splitlines()[-1])
    if path.stem == "default":
        cmp = infoprompt(summary_line(block, "compare"), tmp_path)
        assert cmp.returncode == 0 and "| infoprompt | 1 |" in cmp.stdout, cmp.stderr[-2000:]
