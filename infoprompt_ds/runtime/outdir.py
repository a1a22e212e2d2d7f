"""The output folder: one training at a time in it, and nothing of another run (or of the user) lost.

* An exclusive lock (`fcntl.flock` on `output_dir/.infoprompt.lock`), taken at the end of pre-flight and
  held by rank 0 until the process ends: a second training on the same folder fails in pre-flight.
* A fresh run refuses a folder holding another run's state (config, metrics, export, best, checkpoints)
  unless --overwrite_output_dir; overwriting then removes only what this program writes, and a file it
  did not write inside export/, best/ or checkpoints/ is refused instead of deleted.
* A run identity (backbone, width, method, labels, prompt length, bottleneck, training-data fingerprint,
  world size, ZeRO stage, and a run uid) goes into every checkpoint's completion marker. Pruning keeps to
  this run's own checkpoints; a resume compares the identity before any weight is loaded and refuses, in
  one line naming the field, a checkpoint that belongs to something else.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import stat
import uuid
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.io import TMP_NAME

LOCK = ".infoprompt.lock"
STATE = ("metrics.json", "config.json", "ds_config.json", "export", "best", "checkpoints")
# What an export folder may hold: ours, plus a PEFT-format adapter and its card written beside it.
EXPORT_FILES = re.compile(r"infoprompt\.safetensors|infoprompt_config\.json|adapter_.*|README\.md")
# Written at start-up, before any step: a folder holding only these saw no step (a failed start) and holds
# nothing a fresh run could lose; refusing it blocked the corrected command (issue 34 item 5).
STARTUP_ONLY = {"config.json", "ds_config.json"}
CHECKPOINT_ENTRIES = re.compile(r"latest|step\d+|zero_to_\w+\.py")  # DeepSpeed adds its converters


def _state(out: Path) -> list[str]:
    return [n for n in STATE if (out / n).exists() and not ((out / n).is_dir() and not any((out / n).iterdir()))]


def _foreign(out: Path) -> Optional[Path]:
    """The first entry of export/, best/ or checkpoints/ that this program does not write, if any."""
    for sub, pattern in (("export", EXPORT_FILES), ("best", EXPORT_FILES), ("checkpoints", CHECKPOINT_ENTRIES)):
        d = out / sub
        if d.is_dir():
            for entry in sorted(d.iterdir()):
                if TMP_NAME.fullmatch(entry.name):
                    continue  # a temporary of ours, left by a write that was killed (io.atomic_file)
                if not pattern.fullmatch(entry.name) or (sub == "checkpoints" and entry.name.startswith("step")
                                                          and not entry.is_dir()):
                    return entry
        elif d.exists():
            return d
    return None


def _refuse_unsafe_lock(path: Path, st: os.stat_result) -> None:
    """The lock is written through: a symlink, a non-file or another user's file there would redirect that
    write (issue 34 item 1)."""
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ConfigError("output_dir", f"{path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a regular file'}"
                          f"; refusing to write the lock through it (remove it, or choose another output_dir)")
    if st.st_uid != os.geteuid():
        raise ConfigError("output_dir", f"{path} belongs to uid {st.st_uid}, not you; refusing to use another "
                          f"user's lock (remove it, or choose another output_dir)")


def _refuse_foreign_folder(out: Path) -> None:
    """Another user's (or a world-writable) output folder: that user could swap checkpoints and exports.
    Checked whatever the MLflow store (issue 34 item 1)."""
    st = out.stat()
    if st.st_uid != os.geteuid() and st.st_uid != 0:
        raise ConfigError("output_dir", f"{out} belongs to uid {st.st_uid}, not you; refusing to write checkpoints "
                          f"and exports where another user can replace them (choose another output_dir)")
    if st.st_mode & 0o002 and not st.st_mode & 0o1000:
        raise ConfigError("output_dir", f"{out} is world-writable; anyone could replace its checkpoints and "
                          f"exports (chmod o-w {out}, or choose another output_dir)")


def _probe_lock(out: Path) -> None:
    path = out / LOCK
    try:
        _refuse_unsafe_lock(path, path.lstat())
    except FileNotFoundError:
        return
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "another process"
            raise ConfigError("output_dir", f"{out} is in use by another training ({holder}; lock {path}); wait "
                              f"for it to end or choose another output_dir")
        except OSError:
            return  # a file system without locks: the real acquisition says so
        fcntl.flock(f, fcntl.LOCK_UN)


def check_output_dir_state(cfg: TrainConfig) -> None:
    """Pre-flight, writes nothing: the folder is free, and it holds no run this one would silently mix with
    or destroy."""
    out = Path(cfg.output_dir)
    # Rank 0 alone: it takes the lock (and may clear an overwritten run) while the other ranks are still in
    # pre-flight; they would see their own job's lock. Its refusal ends the job (the launcher stops the rest).
    if not out.is_dir() or int(os.environ.get("RANK", 0)) != 0:
        return
    _refuse_foreign_folder(out)
    _probe_lock(out)
    state = _state(out)
    if set(state) <= STARTUP_ONLY:
        state = []
    if state and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        raise ConfigError("output_dir", f"{out} holds another run ({', '.join(state)}); pass --overwrite_output_dir "
                          f"true to replace it, --resume_from_checkpoint latest to continue it, or another output_dir")
    foreign = _foreign(out) if state else None
    if foreign is not None:
        raise ConfigError("output_dir", f"{foreign} was not written by infoprompt and would be replaced; move it "
                          f"out of {out} first")


def lock_output_dir(cfg: TrainConfig, rank: int):
    """Rank 0 takes the folder's lock for the rest of the process (keep the returned file open); other
    ranks return None. A fresh run with --overwrite_output_dir then clears the previous run's files."""
    if rank != 0:
        return None
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink planted since pre-flight: never write through it
            raise ConfigError("output_dir", f"{out / LOCK} is a symlink; refusing to write the lock through it "
                              f"(remove it, or choose another output_dir)")
        raise ConfigError("output_dir", f"cannot create {out}: {e.strerror or e}")
    try:
        _refuse_unsafe_lock(out / LOCK, os.fstat(fd))
    except ConfigError:
        os.close(fd)
        raise
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError("output_dir", f"{out} is in use by another training ({holder}; lock {out / LOCK}); wait "
                          f"for it to end or choose another output_dir")
    except OSError as e:
        print(f"warning: output_dir: {out} cannot be locked ({e.strerror or e}); do not start two trainings on it",
              flush=True)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
        clear_previous_run(out)
    return f


def clear_previous_run(out: Path) -> None:
    """Remove what an earlier run of this program wrote (checked by check_output_dir_state: nothing else
    is in export/, best/ or checkpoints/). Other files in output_dir are left alone."""
    for name in ("metrics.json", "export", "best", "checkpoints"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# --- run identity ------------------------------------------------------------------------------------

def data_fingerprint(split) -> str:
    """sha256 of the tokenized training split (token ids and labels, in order): another dataset, another
    few-shot sample or another max_length give another fingerprint."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = split.with_format("arrow")[:]
    h = hashlib.sha256()
    for col in ("input_ids", "labels"):
        arr = table.column(col).combine_chunks()
        while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            h.update(pc.list_value_length(arr).to_numpy(zero_copy_only=False).tobytes())
            arr = arr.flatten()
        h.update(arr.to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()[:16]


def run_identity(cfg: TrainConfig, data, model_config, world: int, stage: int, resume: Optional[Path]) -> dict:
    """What a checkpoint belongs to. The run uid continues a resumed run's, else it is new."""
    from infoprompt_ds.runtime.checkpoint import read_marker

    previous = (read_marker(resume) or {}).get("run", {}) if resume is not None else {}
    return {"run_uid": previous.get("run_uid") or uuid.uuid4().hex,
            "backbone": cfg.model_name_or_path, "hidden_size": model_config.hidden_size, "method": cfg.method,
            "task_type": data.task.type, "labels": list(data.label_names),
            "n_virtual_tokens": cfg.n_virtual_tokens if cfg.method != "probe" else 0,
            "bottleneck_dim": cfg.bottleneck_dim if cfg.method == "infoprompt" else None,
            "data": data_fingerprint(data.splits["train"]), "world_size": world, "zero_stage": stage,
            "precision": cfg.precision}


_SHARD = re.compile(r"(?:\w+_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
# DeepSpeed's module states: one per rank under ZeRO-3 (zero_pp_rank_R_...), one file otherwise (group 1 None).
_MODEL = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_\d+_model_states\.pt")
_WHAT = {"backbone": "backbone", "hidden_size": "backbone width", "method": "method", "task_type": "task type",
         "labels": "label list", "n_virtual_tokens": "prompt length (n_virtual_tokens)",
         "bottleneck_dim": "bottleneck_dim", "data": "training data (train split fingerprint: dataset, k_shot, "
         "seed or max_length)"}


def check_resume(tag_dir: Path, identity: dict[str, Any]) -> None:
    """Before any weight is loaded: the checkpoint's shards are all there and it belongs to this run's
    configuration. One ConfigError line naming the first mismatch."""
    from infoprompt_ds.runtime.checkpoint import read_marker

    saved = (read_marker(tag_dir) or {}).get("run") or {}
    ranks = {int(m.group(1)): p for p in tag_dir.iterdir() if (m := _SHARD.fullmatch(p.name))}
    stage = saved.get("zero_stage", 3 if ranks else 0)
    saved_world = saved.get("world_size", len(ranks) if ranks else identity["world_size"])
    if stage and saved_world != identity["world_size"]:
        raise ConfigError("resume_from_checkpoint", f"{tag_dir} was saved by {saved_world} rank(s), this job has "
                          f"{identity['world_size']}: ZeRO-{stage} optimizer states are split per rank and are not "
                          f"resharded on load; resume with {saved_world} rank(s)")
    if saved and saved.get("zero_stage") != identity["zero_stage"]:
        raise ConfigError("resume_from_checkpoint", f"{tag_dir} was saved with ZeRO stage {saved.get('zero_stage')}, "
                          f"this run uses {identity['zero_stage']}; resume with the same DeepSpeed json")
    for r in range(saved_world if stage else 0):
        shard = ranks.get(r)
        if shard is None or shard.stat().st_size == 0:
            raise ConfigError("resume_from_checkpoint", f"{tag_dir} is missing the optimizer shard of rank {r} "
                              f"({'deleted' if shard is None else f'{shard.name} is empty'}); resume from another "
                              f"checkpoint folder")
    models = {int(m.group(1)) if m.group(1) else None: p for p in tag_dir.iterdir() if (m := _MODEL.fullmatch(p.name))}
    for r in ((range(saved_world) if stage == 3 else [None]) if stage else []):  # stage 3: one file per rank
        model = models.get(r)
        if model is None or model.stat().st_size == 0:
            raise ConfigError("resume_from_checkpoint", f"{tag_dir} is missing the model states of rank "
                              f"{0 if r is None else r} ({'deleted' if model is None else f'{model.name} is empty'}); "
                              f"resume from another checkpoint folder")
    # Checkpoints from before the field have no precision: not compared (issue 34 item 7).
    if saved.get("precision", identity["precision"]) != identity["precision"]:
        want = saved["precision"]
        raise ConfigError(want if want != "fp32" else identity["precision"], f"{tag_dir} was saved by a "
                          f"{want} run, this run is {identity['precision']}: a change of precision is refused, not "
                          f"converted (the optimizer states are laid out for {want}); resume with "
                          f"{'--bf16 true' if want == 'bf16' else '--fp16 true' if want == 'fp16' else '--bf16 false --fp16 false'}")
    for key, what in _WHAT.items():
        if saved and saved.get(key) != identity[key]:
            raise ConfigError("resume_from_checkpoint", f"{tag_dir} belongs to another run: its {what} is "
                              f"{saved.get(key)!r}, this run's is {identity[key]!r}; resume with the same settings "
                              f"or train into another output_dir")


# Not edits of the json: derived from the step count, which a resume may extend (--max_steps 8 after 4), or
# from --offload_dir (scratch swap files, refilled from the backbone at every start).
_STEP_DERIVED = {"scheduler.params.total_num_steps", "scheduler.params.warmup_num_steps",
                 "zero_optimization.offload_param.nvme_path", "zero_optimization.offload_optimizer.nvme_path"}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def check_resume_plan(tag_dir: Path, total_steps: int, ds_config: dict, out: Path) -> None:
    """A resume that silently did something else (issue 34 item 6): a checkpoint past this run's last step
    (a smaller --max_steps) is refused; a DeepSpeed json edited since the run started is said in one line,
    since the MLflow run keeps the parameters it logged first."""
    import json

    from infoprompt_ds.runtime.checkpoint import folder_bytes, read_marker

    done = (read_marker(tag_dir) or {}).get("global_step", 0)
    if done > total_steps:
        raise ConfigError("max_steps", f"{tag_dir} is at step {done}, past this run's last step {total_steps}; "
                          f"give --max_steps {done} or more to continue it (or resume an earlier checkpoint)")
    where = next(p for p in (out, *out.resolve().parents) if p.exists())  # a resume into a new folder: its parent's disk
    need, free = folder_bytes(tag_dir), shutil.disk_usage(where).free
    if free < need:  # the resume would train, then fail at its first save (issue 34 item 4)
        raise ConfigError("output_dir", f"{out} has {free} bytes free, but a checkpoint needs ~{need} bytes (the size "
                          f"of {tag_dir.name}); free space, then resume")
    try:
        before = _flat(json.loads((out / "ds_config.json").read_text()))
    except (OSError, ValueError):
        return  # no record of the start (an older run): nothing to compare
    now = _flat(ds_config)
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if k not in _STEP_DERIVED and before.get(k) != now.get(k)]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: deepspeed: the DeepSpeed config differs from the one this run started with "
              f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}); resuming with the new values, "
              f"while the MLflow run keeps the parameters it logged first", flush=True)
