"""A normal (non-editable) install runs from any folder: `pip install .` into a virtualenv, then
`infoprompt-train --deepspeed zero3` and `deepspeed --module infoprompt_ds.train` outside the repository,
with the DeepSpeed configs found as package data. The venv sees the system site-packages for the heavy
dependencies (torch, deepspeed, ...) so the test installs only the project itself (--no-deps)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args
from infoprompt_ds.env import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # a wheel built from the source tree: not editable, no path back into the checkout
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(ROOT)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.mktemp("elsewhere"))
    assert p.returncode == 0, p.stderr[-3000:]
    return venv


def env_outside(venv):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}", "PYTHONUNBUFFERED": "1"}


def test_installed_package_is_not_the_checkout(installed, tmp_path):
    p = subprocess.run([str(installed / "bin" / "python"), "-c",
                        "import infoprompt_ds.runtime.ds_config as c; print(c.__file__); "
                        "print(c.resolve_ds_config('zero3'))"],
                       capture_output=True, text=True, cwd=tmp_path, env=env_outside(installed))
    assert p.returncode == 0, p.stderr
    module, ds = p.stdout.split()
    assert module.startswith(str(installed)) and ds.startswith(str(installed)) and ds.endswith("zero3.json")


def test_console_script_and_deepspeed_module_from_another_folder(installed, tmp_path, tiny_bert, sentiment_files):
    env = env_outside(installed)
    p = subprocess.run(["infoprompt-train", "--deepspeed", "zero3", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert p.returncode == 0 and "--deepspeed" in p.stdout, p.stderr
    bad = subprocess.run(["infoprompt-train", "--deepspeed", "zero9"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "zero3" in bad.stderr  # the one-line error names the shipped configs

    for name, cmd in (("script", ["infoprompt-train"]),
                      # the venv's python runs the launcher (this venv has no `deepspeed` script of its own)
                      ("module", [str(installed / "bin" / "python"), "-m", "deepspeed.launcher.runner",
                                  "--num_gpus", "1", "--master_port", str(free_port()), "--module",
                                  "infoprompt_ds.train"])):
        out = tmp_path / name
        args = tiny_args(tiny_bert, sentiment_files, out, max_steps=2, eval_steps=2, deepspeed="zero3")
        p = subprocess.run(cmd + args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert p.returncode == 0, (name, p.stderr[-3000:])
        assert json.loads((out / "metrics.json").read_text())["test"]
