"""Issue 36 item 6: the sweep file `infoprompt --help` names ships in the package and is found from any folder."""

import fnmatch
import re
import tomllib
from pathlib import Path

import infoprompt_ds
from infoprompt_ds import cli
from infoprompt_ds.compare.sweep_spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def test_help_sweep_file_is_package_data(tmp_path, monkeypatch, capsys):
    cli.main(["--help"])
    named = re.search(r"--config (sweeps/\S+\.yaml)", capsys.readouterr().out).group(1)
    pkg = Path(infoprompt_ds.__file__).parent
    assert (pkg / named).is_file(), f"{named} is not in the installed package {pkg}"
    # the wheel carries it: a package-data pattern of pyproject.toml matches it
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["infoprompt_ds"]
    assert any(fnmatch.fnmatch(named, pattern) for pattern in data), data
    # from a folder without sweeps/ (an installed package), the help's path and the bare name both load it
    monkeypatch.chdir(tmp_path)
    for given in (named, Path(named).stem):
        assert load_spec(given).name == Path(named).stem
