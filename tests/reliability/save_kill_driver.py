"""Kill a training run with SIGKILL at precise points inside a checkpoint save, several times in a row,
resuming from `latest` after each kill; then finish and compare with an uninterrupted run.

Run by tests/reliability/test_save_kill.py as `python save_kill_driver.py <json spec>`; prints one JSON
line (the figures) at the end. To make many short runs cheap, this process imports everything once and
each run is a forked child (`os.fork`) that trains through the real `cli.train_main` entry point with
the real DeepSpeed save; the only thing patched in a child is the kill point itself: a wrapper that
calls os.kill(os.getpid(), SIGKILL) at the chosen moment of the chosen save. The parent touches no
torch computation until the last child has ended (OpenMP state must not cross a fork).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: infoprompt_ds


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_point(point: str, target: int) -> None:
    """Patch exactly one moment of the save of step `target` to SIGKILL this process."""
    import shutil

    import torch
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce

    from infoprompt_ds.runtime import checkpoint as ck

    in_target = lambda path: f"step{target}" in str(path)  # noqa: E731
    if point in ("torn_shard", "between_shards"):
        original = tce.TorchCheckpointEngine.save
        calls = {"n": 0}

        def save(self, state_dict, path):
            if in_target(path):
                calls["n"] += 1
                if point == "torn_shard":  # half of the first file's bytes reach the disk, then the kill
                    buf = io.BytesIO()
                    torch.save(state_dict, buf)
                    with open(path, "wb") as f:
                        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    die()
                if calls["n"] == 2:  # the model states are written, the optimizer states not yet
                    die()
            return original(self, state_dict, path)

        tce.TorchCheckpointEngine.save = save
    elif point == "before_marker":  # every shard written, the marker's temp file too, not renamed yet
        original_write = ck.write_json_atomic

        def write_json_atomic(path, data):
            if Path(path).name == ck.MARKER and in_target(path):
                tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
                tmp.write_text(json.dumps(data))
                die()
            return original_write(path, data)

        ck.write_json_atomic = write_json_atomic
    elif point == "before_latest":  # the checkpoint is complete, `latest` still names the previous one
        original_replace = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == "latest" and (Path(dst).parent / f"step{target}" / ck.MARKER).exists():
                die()
            return original_replace(src, dst, *a, **k)

        os.replace = replace  # every atomic write (infoprompt_ds.io) renames through os.replace
    elif point == "during_rotation":  # `latest` names the new one; deleting the oldest is cut half-way
        original_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            p = Path(path)
            if p.name.startswith("step") and p.name != f"step{target}" and (p.parent / "latest").read_text() \
                    == f"step{target}":
                shards = sorted(p.glob("*.pt"))
                if shards:
                    shards[0].unlink()
                die()
            return original_rmtree(path, *a, **k)

        ck.shutil.rmtree = rmtree
    else:
        raise ValueError(point)


def child(args: list[str], point: str | None, target: int) -> None:
    """Runs in the forked child: never returns."""
    code = 0
    try:
        from infoprompt_ds.env import free_port

        os.environ["MASTER_PORT"] = str(free_port())
        if point:
            install_kill_point(point, target)
        from infoprompt_ds.cli import train_main

        log = open(os.environ["SAVE_KILL_LOG"], "a")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        train_main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_child(args, point=None, target=0) -> int:
    import time

    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        child(args, point, target)
    _, status = os.waitpid(pid, 0)
    DURATIONS.append(round(time.time() - t0, 1))
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot(out: Path) -> dict:
    """Plain file-system facts (no torch in the parent): what `latest` resolves to, what is complete."""
    from infoprompt_ds.runtime.checkpoint import checkpoint_root, is_complete, resolve_checkpoint

    root = checkpoint_root(str(out))
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    try:
        resolved = resolve_checkpoint("latest", str(out)).name
    except Exception as e:  # noqa: BLE001 - recorded, the test asserts on it
        resolved = f"error: {e}"
    return {"resolved": resolved, "complete": [d for d in dirs if is_complete(root / d)],
            "incomplete": [d for d in dirs if not is_complete(root / d)]}


DURATIONS: list[float] = []
POINTS = ["torn_shard", "between_shards", "before_marker", "before_latest", "during_rotation"]


def main(spec: dict) -> dict:
    from infoprompt_ds.env import setup_environment

    setup_environment()
    # Import everything a run needs once, here, so that each forked run starts in about a second.
    import deepspeed  # noqa: F401
    import mlflow  # noqa: F401
    import transformers  # noqa: F401

    from infoprompt_ds.runtime import checkpoint  # noqa: F401
    from infoprompt_ds.data import load as data  # noqa: F401
    from infoprompt_ds.method import model  # noqa: F401
    from infoprompt_ds.tracking import client as tracking  # noqa: F401
    from infoprompt_ds.runtime import train_loop  # noqa: F401

    rng = random.Random(spec["seed"])
    base, max_steps = spec["args"], spec["max_steps"]
    work = Path(spec["work"])
    ref_out, out = work / "reference", work / "killed"
    os.environ["SAVE_KILL_LOG"] = str(work / "runs.log")

    def args_for(o: Path, resume: bool) -> list[str]:
        a = [*base, "--output_dir", str(o), "--max_steps", str(max_steps), "--save_steps", "1"]
        return a + (["--resume_from_checkpoint", "latest"] if resume else [])

    figures = {"reference_rc": run_child(args_for(ref_out, False)), "kills": []}
    step = 0  # the step the next run resumes from
    for i, point in enumerate(spec["points"]):
        # a random save of this run, leaving room for the ones after it
        lo = step + 2
        target = rng.randint(lo, max(lo, max_steps - 1 - (len(spec["points"]) - i)))
        rc = run_child(args_for(out, step > 0), point, target)
        snap = snapshot(out)
        expected = f"step{target}" if point == "during_rotation" else f"step{target - 1}"
        figures["kills"].append({"point": point, "target_step": target, "rc": rc, "expected": expected, **snap})
        resolved = snap["resolved"]
        step = int(resolved[4:]) if resolved.startswith("step") else step
    figures["final_rc"] = run_child(args_for(out, True))
    # All forks are done: torch may run here now.
    import torch
    from safetensors.torch import load_file

    a = load_file(str(ref_out / "export" / "infoprompt.safetensors"))
    b = load_file(str(out / "export" / "infoprompt.safetensors"))
    figures["run_seconds"] = DURATIONS
    figures["bitwise_equal"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    figures["max_abs_diff"] = max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0) \
        if set(a) == set(b) else float("inf")
    figures["final_metrics"] = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
    figures["reference_metrics"] = json.loads((ref_out / "metrics.json").read_text()) \
        if (ref_out / "metrics.json").exists() else None
    return figures


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print(json.dumps(result), flush=True)
