"""Checkpoints: DeepSpeed checkpoints for exact resume, and a small export of the trained parts.

A DeepSpeed checkpoint is complete only once `infoprompt_complete.json` sits in its folder; that marker
is written (atomically) after every rank has finished writing, and `latest` (also replaced atomically)
only ever names complete checkpoints. A save killed half-way leaves a folder without the marker, which
`resolve_checkpoint` skips and the next save of that tag deletes: it can never be loaded.

The export holds only the trainable tensors (safetensors) and a JSON config naming the backbone;
the frozen backbone is never stored again.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infoprompt_ds.config import ConfigError, one_line
from infoprompt_ds.internals import deepspeed_safe_globals
from infoprompt_ds.io import atomic_dir, write_json_atomic, write_text_atomic  # noqa: F401 (atomic_dir: re-exported)
from infoprompt_ds.runtime.peft_export import save_peft_adapter

MARKER = "infoprompt_complete.json"
EXPORT_WEIGHTS = "infoprompt.safetensors"
EXPORT_CONFIG = "infoprompt_config.json"


# --- export: the trained parts only -------------------------------------------------------------------

def save_export(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_dir(Path(path)) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / EXPORT_WEIGHTS))
        (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))
        save_peft_adapter(tmp, tensors, meta)  # the prompt as a PEFT adapter too (peft_export.py)


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not (path / EXPORT_WEIGHTS).is_file() or not (path / EXPORT_CONFIG).is_file():
        raise ConfigError("export", f"{path} is not an infoprompt export (needs {EXPORT_WEIGHTS} and {EXPORT_CONFIG})")
    try:  # safetensors only: no pickle is ever unpickled from an export
        tensors, meta = load_file(str(path / EXPORT_WEIGHTS)), json.loads((path / EXPORT_CONFIG).read_text())
    except Exception as e:  # a truncated/tampered weights file or a broken JSON: one clear line
        raise ConfigError("export", f"{path} could not be read as an infoprompt export (safetensors + JSON): "
                          f"{one_line(e)}")
    for name, t in tensors.items():  # a NaN adapter predicted one class for everything, silently (issue 34)
        bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if bad:
            raise ConfigError("export", f"{path / EXPORT_WEIGHTS}: {name} holds {bad} NaN/inf value(s) of {t.numel()}; "
                              f"it cannot predict; use another export (best/, or one from an earlier checkpoint)")
    return tensors, meta


# --- DeepSpeed checkpoints ----------------------------------------------------------------------------

def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """The completion marker, or None when it is missing or malformed (hand-edited, truncated, another
    program's): such a folder is not a complete checkpoint, and must never crash a save or a resume."""
    try:
        marker = json.loads((Path(tag_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("global_step"), int) \
        and isinstance(marker.get("run", {}), dict)
    return marker if ok else None


def is_complete(tag_dir: Path) -> bool:
    return read_marker(tag_dir) is not None


def _step(tag_dir: Path) -> int:
    return read_marker(tag_dir)["global_step"]


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and is_complete(d)), key=_step)


def resolve_checkpoint(spec: str, output_dir: str) -> Path:
    """'latest' → the newest complete checkpoint under output_dir/checkpoints; else a checkpoint folder."""
    if spec == "latest":
        root = checkpoint_root(output_dir)
        latest = root / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            named = root / name
            # `latest` names a folder of this checkpoints folder, never a path elsewhere (another run's)
            if "/" in name or "\\" in name or name in ("", ".", "..") or named.resolve().parent != root.resolve():
                raise ConfigError("resume_from_checkpoint", f"{latest} names {name!r}, which is not a checkpoint "
                                  f"folder inside {root}; delete {latest} to resume from the newest complete one")
            if is_complete(named):
                return named
        done = complete_checkpoints(root)
        if not done:
            raise ConfigError("resume_from_checkpoint", f"no complete checkpoint under {root}; train without "
                              f"--resume_from_checkpoint or point it at a checkpoint folder")
        return done[-1]
    path = Path(spec)
    if not is_complete(path):
        raise ConfigError("resume_from_checkpoint", f"{spec} is not a complete checkpoint folder (no {MARKER})")
    return path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _disk_full(error: BaseException, root: Path, need: int) -> bool:
    """ENOSPC/EDQUOT/EFBIG anywhere in the cause chain, or (torch's zip writer says only "file write
    failed") less room left than a checkpoint takes."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        e = e.__cause__ or e.__context__
    return shutil.disk_usage(root).free < max(need, 1 << 20)  # no checkpoint yet to size: under 1 MiB is full


def _failed_save(error: BaseException | None, root: Path, tag: str, rank: int) -> Exception:
    """What every rank raises once a save failed on any rank. Rank 0 removes the partial folder first (it
    has no marker, so it was never loadable; removing it gives the space back). A full disk is one line
    naming the folder and the bytes a checkpoint needs (issue 34 item 4); anything else stays an error."""
    done = complete_checkpoints(root)
    need = folder_bytes(done[-1]) if done else 0
    full = _disk_full(error if error is not None else RuntimeError(), root, need)  # before the partial folder goes
    free = shutil.disk_usage(root).free
    if rank == 0:
        shutil.rmtree(root / tag, ignore_errors=True)
    if not full:
        return error if error is not None else RuntimeError(f"the checkpoint {tag} failed on another rank (its "
                                                            f"error is in that rank's output)")
    return ConfigError("output_dir", f"disk full: the checkpoint {tag} could not be written in {root} (a checkpoint "
                       f"needs ~{need or 'unknown'} bytes{f', the size of {done[-1].name}' if done else ''}; "
                       f"{free} bytes free); the last complete checkpoint is {done[-1].name if done else 'none'}; "
                       f"free space, then resume with --resume_from_checkpoint latest")


def save_checkpoint(engine, output_dir: str, step: int, client_state: dict[str, Any], keep: int,
                    rank: int, identity: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Frozen backbone weights are excluded. `identity` (outdir.run_identity)
    goes into the marker: a resume checks it, and only this run's own checkpoints count towards `keep`.
    A failure on any rank (a full disk) is agreed on, so that every rank raises instead of waiting."""
    import torch.distributed as dist

    from infoprompt_ds.runtime.distributed import all_min

    root = checkpoint_root(output_dir)
    tag = f"step{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)  # a leftover of a killed save of this step
    dist.barrier()
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:  # torch's writer raises RuntimeError on a full disk
        error = e
    if not all_min(error is None):  # also the barrier: every rank's shard is on disk before the marker
        raise _failed_save(error, root, tag, rank)
    if rank == 0:
        try:
            write_json_atomic(root / tag / MARKER, {"global_step": step, **({"run": identity} if identity else {})})
            write_text_atomic(root / "latest", tag)
        except OSError as e:
            error = e
    if not all_min(error is None):
        raise _failed_save(error, root, tag, rank)
    if rank == 0:
        uid = (identity or {}).get("run_uid")
        own = [d for d in complete_checkpoints(root) if (read_marker(d) or {}).get("run", {}).get("run_uid") == uid]
        for old in own[:-keep]:
            (old / MARKER).unlink(missing_ok=True)  # first: a deletion killed half-way leaves no "complete" folder
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def verify_checkpoint_files(tag_dir: Path) -> None:
    """DeepSpeed's load_checkpoint calls torch.load(weights_only=False), which runs any code a pickle
    names. Before a checkpoint is handed to it, every pickle-like file in the folder must load with
    torch.load(weights_only=True) (tensors, containers, primitives and the few DeepSpeed data classes
    named in internals.DEEPSPEED_SAFE_GLOBALS): a tampered file is refused with a ConfigError naming it, and its payload never runs."""
    tag_dir = Path(tag_dir)
    allowed = deepspeed_safe_globals()
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES):
        if path.stat().st_size == 0:
            raise ConfigError("resume_from_checkpoint", f"{path} is empty (0 bytes): a shard cut short or emptied; "
                              f"resume from another checkpoint folder")
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = next((line.strip() for line in str(e).splitlines()
                          if "GLOBAL" in line or "nsupported" in line), "")
            raise ConfigError("resume_from_checkpoint", f"refusing to load {path}: it is not a plain-tensor "
                              f"checkpoint file (torch.load weights_only=True failed: "
                              f"{first or type(e).__name__}); it may have been tampered with")


def load_checkpoint(engine, tag_dir: Path) -> dict[str, Any]:
    verify_checkpoint_files(tag_dir)  # DeepSpeed itself unpickles with weights_only=False
    # load_module_strict=False: the checkpoint holds no frozen weights (exclude_frozen_parameters=True).
    _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False)
    if client_state is None:
        raise ConfigError("resume_from_checkpoint", f"DeepSpeed could not load {tag_dir}")
    return client_state
