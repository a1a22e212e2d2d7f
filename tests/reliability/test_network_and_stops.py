"""Process-level: what a run listens on, and how Ctrl-C / a closed terminal stop it (issue 15, items 1, 8).

* a one-process `python train.py` and a single-node 2-rank `deepspeed` job: every socket any training
  process listens on, sampled through the whole run, is bound to a loopback address;
* SIGINT (Ctrl-C) and SIGHUP (the terminal closed) stop like SIGTERM: the step finishes, a checkpoint is
  saved, exit code 75, and `--resume_from_checkpoint latest` would find it.
"""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

import psutil
import pytest

from conftest import tiny_args
from reliability_lib import deepspeed_cmd, kill_session, launch, python_cmd, record, wait_until

pytestmark = pytest.mark.reliability


def _listeners(root: psutil.Process) -> set[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket of `root` and its descendants."""
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for p in procs:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.pid, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return found


def _watch(cmd, log: Path, timeout: float = 600) -> tuple[int, set]:
    proc = launch(cmd, log)
    seen: set = set()
    try:
        root = psutil.Process(proc.pid)

        def done():
            seen.update(_listeners(root))
            return proc.poll() is not None

        wait_until(done, timeout, poll=0.1)
        return proc.wait(timeout=60), seen
    finally:
        kill_session(proc)


def _non_loopback(seen: set) -> list:
    return [s for s in seen if not ipaddress.ip_address(s[1].split("%")[0]).is_loopback]


def test_one_process_run_listens_only_on_loopback(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "run"
    rc, seen = _watch(python_cmd(tiny_args(tiny_bert, sentiment_files, out, max_steps=24, eval_steps=1000)),
                      tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    assert seen, "no listening socket was ever sampled: the watch itself is broken"
    assert not _non_loopback(seen), seen
    record("network", case="one process", tried=1, clean=1)


def test_single_node_two_ranks_listen_only_on_loopback(tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "run"
    rc, seen = _watch(deepspeed_cmd(tiny_args(tiny_bert, sentiment_files, out, max_steps=4, eval_steps=1000)),
                      tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    assert seen
    assert not _non_loopback(seen), seen
    record("network", case="2 ranks, one node", tried=1, clean=1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_save_and_exit_75(sig, tiny_bert, sentiment_files, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "log"
    proc = launch(python_cmd(tiny_args(tiny_bert, sentiment_files, out, max_steps=5000, eval_steps=100000,
                                       logging_steps=1)), log)
    try:
        # training has started once the per-rank shard report exists (written after deepspeed.initialize)
        assert wait_until(lambda: (out / "ranks" / "rank0.json").exists()
                          and "train:" in log.read_text(), 300, proc), log.read_text()[-3000:]
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc)
    text = log.read_text()
    assert rc == 75, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    from infoprompt_ds.runtime.checkpoint import resolve_checkpoint

    assert resolve_checkpoint("latest", str(out)).is_dir()
    record("stops", case=signal.Signals(sig).name, tried=1, clean=1)
