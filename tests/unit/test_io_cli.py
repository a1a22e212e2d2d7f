"""The small shared helpers: atomic writes (infoprompt_ds/io.py), the one-line error exit
(infoprompt_ds/errors.py), the free port (infoprompt_ds/env.py) and the `infoprompt <command>` entry."""

from __future__ import annotations

import json
import socket

import pytest

from infoprompt_ds import cli
from infoprompt_ds.config import ConfigError
from infoprompt_ds.env import free_port
from infoprompt_ds.errors import exit_on_config_error, fail
from infoprompt_ds.io import atomic_file, write_json_atomic, write_text_atomic


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"x": 2}  # the old file, whole
    write_text_atomic(tmp_path / "b.txt", "hello")
    assert (tmp_path / "b.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.txt", "sub"]


def test_fail_is_one_line_and_the_exit_code(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        exit_on_config_error(lambda: (_ for _ in ()).throw(ConfigError("k_shot", "must be > 0")))
    assert e.value.code == 2 and capsys.readouterr().err == "error: k_shot: must be > 0\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launched rank (a stray RANK alone prints: see test_preflight)
    with pytest.raises(SystemExit) as e:
        fail("diverged", 3, rank0_only=True)
    assert e.value.code == 3 and capsys.readouterr().err == ""  # one line for the job: rank 0's


def test_free_port_is_bindable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_infoprompt_command_dispatches_and_refuses_unknown(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: command: expected one of train, predict")
    cli.main(["--help"])
    assert "infoprompt train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # reaches predict's own checks: not an export
        cli.main(["predict", "--export", str(tmp_path), "--text", "a good film"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: export: ")
