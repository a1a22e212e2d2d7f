"""Helpers of the reliability tests (tests/reliability/): launching and killing real jobs, and recording
the figures (faults injected / survived, malformed inputs tried / refused) that
`python tools/reliability_report.py` collects into docs/reliability.md.

A test records figures by appending one JSON line to $INFOPROMPT_RELIABILITY_LOG (nothing when unset)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from infoprompt_ds.env import free_port  # noqa: F401 (the tests import it from here)

ROOT = Path(__file__).resolve().parents[2]
LOG_ENV = "INFOPROMPT_RELIABILITY_LOG"
SEED_ENV = "INFOPROMPT_RELIABILITY_SEED"  # the report varies it; the test suite uses the default 0


def seed() -> int:
    return int(os.environ.get(SEED_ENV, "0"))


def record(item: str, **figures) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"item": item, **figures}) + "\n")




def launch(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a job in its own session (so a test can always clean up all of it), output to `log`."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def deepspeed_cmd(args: list[str], nproc: int = 2) -> list[str]:
    # A free master port: other jobs on the machine (and other tests) may hold the default 29500.
    return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), str(ROOT / "train.py"),
            "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), *args]


def kill_session(proc: subprocess.Popen) -> None:
    """Cleanup: end what this test started (its own process group only)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def rank_pids(proc: subprocess.Popen, n: int, timeout: float = 300) -> dict[int, int]:
    """{local rank: pid} of the training processes under a `deepspeed` launcher (its grandchildren,
    started with --local_rank=N)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    for arg in child.cmdline():
                        if arg.startswith("--local_rank="):
                            ranks[int(arg.split("=", 1)[1])] = child.pid
                except psutil.Error:
                    pass
        except psutil.NoSuchProcess:
            break
        if len(ranks) == n:
            return ranks
        time.sleep(0.2)
    raise AssertionError(f"did not find {n} rank processes under pid {proc.pid}")


def wait_until(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


_NOISE = re.compile(r"Setting accelerator to CPU|^\s*$")


def stderr_lines(text: str) -> list[str]:
    """Meaningful lines of a stderr: split on \\n and \\r (progress bars), noise removed."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if not _NOISE.search(line)]


def python_cmd(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


class Accepted(Exception):
    """prepare() passed: the input was not refused."""


def prepare_in_process(argv: list[str], env: dict | None = None) -> tuple[object, list[str], str]:
    """The real entry point (`cli.train_main`) with `train_loop.run` cut after pre-flight
    (setup_environment + prepare): (exit code or "accepted", meaningful stderr lines, stdout)."""
    import contextlib
    import io

    from infoprompt_ds import cli
    from infoprompt_ds.env import setup_environment
    from infoprompt_ds.runtime import train_loop as tl
    from infoprompt_ds.runtime.prepare import prepare

    def first_half(cfg):
        setup_environment()
        prep = prepare(cfg)
        if prep.lock is not None:
            prep.lock.close()
        raise Accepted()

    import signal

    saved, real_run = dict(os.environ), tl.run
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    os.environ.update(env or {})
    tl.run = first_half
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            cli.train_main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except Accepted:
        code = "accepted"
    finally:
        tl.run = real_run
        for sig, handler in handlers.items():  # train_main catches stop signals from its first line
            signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(saved)
    return code, stderr_lines(err.getvalue()), out.getvalue()


def assert_refused(argv: list[str], field: str, needle: str = "", env: dict | None = None) -> str:
    """Exit 2 and exactly one stderr line `error: <field>: ...` containing `needle`; returns the line."""
    code, lines, _ = prepare_in_process(argv, env)
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), lines
    assert needle in lines[0], lines
    return lines[0]


def record_case(request, item: str) -> None:
    """From an autouse fixture after its yield: one case tried, clean when its test body passed."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.skipped:  # not tried here (e.g. a read-only folder cannot stop root)
        return
    record(item, case=request.node.name, tried=1, clean=int(bool(rep and rep.passed)))


@contextmanager
def small_tmpfs(where: Path, size: str):
    """A real small disk (tmpfs of `size`, e.g. "16m") mounted at `where` for the with-block; skips the test
    where mounting is not allowed (not root, or no mount)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    where.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)])


def fill(path: Path) -> None:
    """Write zeros to `path` until its disk is full (ENOSPC), flushing every block so that it really is."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        with open(path, "ab") as f:  # the last partial block
            while True:
                f.write(b"\0")
                f.flush()
    except OSError:
        pass
