"""The DeepSpeed json: the shipped configs by name, loading, filling its "auto" values from the run's
config (as the HF Trainer does), and the checks that make a bad json fail before any process group exists."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import ConfigError, TrainConfig

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"  # shipped DeepSpeed configs (package data)


def resolve_ds_config(path: Optional[str]) -> Path:
    """A DeepSpeed json path as given, else a shipped config by name (`zero3` or `zero3.json`), so the
    installed package runs from any folder; the repo's `ds_configs/` links to the same files."""
    p = Path(path or "zero3")
    if p.is_file():
        return p
    shipped = DS_CONFIGS / (p.name if p.suffix == ".json" else p.name + ".json")
    if p.parent in (Path("."), Path("ds_configs")) and shipped.is_file():
        return shipped
    names = ", ".join(sorted(f.stem for f in DS_CONFIGS.glob("*.json")))
    raise ConfigError("deepspeed", f"DeepSpeed config not found: {path} (a json path, or one of: {names})")


def load_ds_config(path: Optional[str]) -> dict[str, Any]:
    p = resolve_ds_config(path)
    path = str(p)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("deepspeed", f"{path} is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        raise ConfigError("deepspeed", f"{path} must hold a JSON object")
    stage = cfg.get("zero_optimization", {}).get("stage", 0) if isinstance(cfg.get("zero_optimization", {}), dict) else None
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ConfigError("deepspeed", f"zero_optimization.stage must be 0-3 in {path}, got {stage!r}")
    return cfg


def offload_dir(cfg: TrainConfig) -> str:
    """Where ZeRO-Infinity's swap files go: --offload_dir, else a folder inside output_dir."""
    return cfg.offload_dir or str(Path(cfg.output_dir) / "offload")


def fill_ds_config(ds: dict[str, Any], cfg: TrainConfig, world_size: int, total_steps: int,
                   hidden_size: int, largest_weight: int = 0) -> dict[str, Any]:
    """Replace every "auto" in the DeepSpeed json with the value this config implies (as HF Trainer does).

    Values the user wrote explicitly must agree with the config where both set the same thing, or the
    run would silently train with a batch size nobody asked for.
    """
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    fills = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer.params.lr": cfg.learning_rate,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": cfg.learning_rate,
        "scheduler.params.warmup_num_steps": warmup,
        "scheduler.params.total_num_steps": total_steps,
        "bf16.enabled": cfg.bf16,
        "fp16.enabled": cfg.fp16,
        # ZeRO-3 bucket sizes scale with the model width, as the HF Trainer's integration sets them.
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        # ZeRO-Infinity: the swap folder, and swap buffers large enough for the largest weight (the
        # embedding, vocab x d), which DeepSpeed's param swapper asserts (numel <= buffer_size).
        "zero_optimization.offload_param.nvme_path": offload_dir(cfg),
        "zero_optimization.offload_optimizer.nvme_path": offload_dir(cfg),
        "zero_optimization.offload_param.buffer_size": max(largest_weight, hidden_size * hidden_size, 10**6),
    }
    out = json.loads(json.dumps(ds))

    def walk(node, prefix):
        for key, value in list(node.items()):
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif value == "auto":
                if name not in fills:
                    raise ConfigError("deepspeed", f"'auto' is not supported for {name}; set a value")
                node[key] = fills[name]
            elif name in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") \
                    and value != fills[name]:
                raise ConfigError("deepspeed", f"{name}={value} disagrees with the config ({fills[name]}); "
                                  f"set it to \"auto\" or change the config")

    walk(out, "")
    check_ds_config(out)
    return out


def ds_value(ds: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a DeepSpeed json ("zero_optimization.stage"), None where absent."""
    node: Any = ds
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def check_ds_config(ds: dict[str, Any]) -> None:
    """What deepspeed.initialize would only find after the process group and the model exist: values of
    the wrong type, unknown optimizer/scheduler names, and whatever DeepSpeed's own config schema rejects."""
    def get(path: str):
        return ds_value(ds, path)

    for section in ("optimizer", "scheduler", "optimizer.params", "scheduler.params", "bf16", "fp16"):
        if get(section) is not None and not isinstance(get(section), dict):
            raise ConfigError("deepspeed", f"{section} must be a JSON object, got {get(section)!r}")
    for path in ("gradient_clipping", "optimizer.params.lr", "optimizer.params.weight_decay", "optimizer.params.eps",
                 "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr",
                 "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps",
                 "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                 "zero_optimization.stage3_param_persistence_threshold", "train_micro_batch_size_per_gpu",
                 "gradient_accumulation_steps", "train_batch_size"):
        value = get(path)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ConfigError("deepspeed", f"{path} must be a number >= 0, got {value!r}")
    for path in ("bf16.enabled", "fp16.enabled"):
        if get(path) is not None and not isinstance(get(path), bool):
            raise ConfigError("deepspeed", f"{path} must be true or false, got {get(path)!r}")
    betas = get("optimizer.params.betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == 2
                                  and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise ConfigError("deepspeed", f"optimizer.params.betas must be a list of 2 numbers, got {betas!r}")
    import torch

    from infoprompt_ds.internals import (deepspeed_config_class, deepspeed_lr_schedules, deepspeed_optimizer_names)

    DEEPSPEED_OPTIMIZERS, VALID_LR_SCHEDULES = deepspeed_optimizer_names(), deepspeed_lr_schedules()

    name = get("optimizer.type")
    if get("optimizer") is not None and not (isinstance(name, str) and (name.lower() in DEEPSPEED_OPTIMIZERS
                                                                        or hasattr(torch.optim, name))):
        raise ConfigError("deepspeed", f"optimizer.type {name!r} is not a DeepSpeed or torch.optim optimizer")
    name = get("scheduler.type")
    if get("scheduler") is not None and name not in VALID_LR_SCHEDULES:
        raise ConfigError("deepspeed", f"scheduler.type {name!r} is not one of {', '.join(VALID_LR_SCHEDULES)}")
    # DeepSpeed's own schema (pydantic): checked as a one-rank job, since the batch arithmetic (the only
    # part that depends on the world size) was checked above.
    import torch.distributed as dist

    # DeepSpeedConfig reads the world size from torch.distributed once a process group exists.
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    one_rank = json.loads(json.dumps(ds))
    if isinstance(one_rank.get("train_micro_batch_size_per_gpu"), int) \
            and isinstance(one_rank.get("gradient_accumulation_steps"), int):
        one_rank["train_batch_size"] = (one_rank["train_micro_batch_size_per_gpu"]
                                        * one_rank["gradient_accumulation_steps"] * world)
    try:
        deepspeed_config_class()(one_rank)
    except Exception as e:  # pydantic ValidationError, assertion or type errors: keep the lines naming the key
        lines = [line.strip() for line in str(e).splitlines() if line.strip()][:3]
        raise ConfigError("deepspeed", " ".join(lines)[:400] or type(e).__name__)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
