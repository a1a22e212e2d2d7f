"""The memory planner: per-rank device memory, host memory and NVMe bytes of a run, from the backbone's
config.json alone (no weights), with docs/scaling.md's arithmetic:

* frozen weights P·b (ZeRO-0/1/2: whole on every rank; ZeRO-3: P·b/N, on the device, in host RAM with
  offload_param cpu, on disk with nvme);
* the gathered working set (ZeRO-3 with the shipped json's prefetch and reuse distance 0: the largest single
  weight; with either on, DeepSpeed keeps every weight gathered until its backward: P·b);
* trainable parameters + AdamW: 16 bytes each (/N from ZeRO-1 on);
* activations (Korthikanti et al. 2022, SDPA/flash attention, 16-bit): ℓ·B·L·d·34 bytes, or with activation
  checkpointing the layer inputs ℓ·B·L·d·b plus one layer's B·L·d·34 recomputed;
* runtime: CUDA context + NCCL on a GPU; torch/DeepSpeed/tokenizer/MLflow per process on the host;
* the load: transformers maps every weight file while it loads (each rank reads each file whole under
  ZeRO-3), so a process's RSS holds all of them until the load ends (file-backed pages, which the kernel
  can drop: RSS, not a requirement) on top of its shard and the swap buffers.

    infoprompt plan --model_name_or_path DIR [train flags] [--ranks N] [--json true] [--table true]

On a machine without a GPU the "device" is the host: everything adds up in RAM.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 2**30
# Fitted to the measured peaks (benchmarks/results/plan_vs_measured.json): a CPU training process takes
# ~0.55 GiB of anonymous memory (torch, DeepSpeed, tokenizer, MLflow, data) plus ~10% of the weights it
# holds (allocator slack around the shards and the buffers ZeRO-3 gathers into);
# a GPU process adds a CUDA context and NCCL buffers (~1 GiB) on the device and ~2.5 GiB of host libraries.
RUNTIME_CPU = 0.55 * GIB
RUNTIME_CPU_PER_WEIGHT_BYTE = 0.10
RUNTIME_GPU_DEVICE = 1.0 * GIB
RUNTIME_GPU_HOST = 2.5 * GIB
ACT_BYTES_PER_TOKEN_WIDTH = 34  # Korthikanti: 34·B·L·d bytes per layer in 16-bit, without the h·L/d term


@dataclass
class Shape:
    """What the planner needs of a backbone, from its config (and a meta-device build for exact counts)."""
    params: int
    largest: int  # elements of the largest single weight (usually the embedding)
    hidden: int
    layers: int
    heads: int
    vocab: int


@dataclass
class Setup:
    stage: int
    ranks: int
    micro_batch: int
    positions: int  # n_virtual_tokens + max_length
    bytes_per_weight: int
    checkpointing: bool
    offload_param: Optional[str]  # None, "cpu" or "nvme"
    offload_optimizer: Optional[str]
    gather_one_at_a_time: bool  # stage3_prefetch_bucket_size == 0 and stage3_max_reuse_distance == 0
    trainable: int
    on_gpu: bool
    swap_buffer_bytes: int = 0  # nvme: buffer_count x buffer_size, pinned host memory
    weight_file_bytes: int = 0  # all weight files (mapped while loading); 0 when unknown


@dataclass
class Plan:
    """Bytes per rank; host_total_bytes and nvme_bytes for the whole node."""
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    device_peak_bytes: int = 0
    host_peak_bytes: int = 0  # max(host_train_bytes, host_load_bytes): the RSS peak
    host_train_bytes: int = 0  # anonymous memory in training (what the OOM killer counts)
    host_load_bytes: int = 0  # RSS while loading, the mapped weight files included
    host_total_bytes: int = 0
    nvme_bytes: int = 0
    ranks: int = 1
    on_gpu: bool = False

    def line(self) -> str:
        where = "GPU" if self.on_gpu else "host (CPU run)"
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.device.items() if v)
        extra = f"; host {self.host_peak_bytes / GIB:.2f} GiB/rank" if self.on_gpu else ""
        nvme = f"; NVMe {self.nvme_bytes / GIB:.2f} GiB" if self.nvme_bytes else ""
        return (f"plan: {self.device_peak_bytes / GIB:.2f} GiB per rank on the {where} ({parts}){extra}{nvme}; "
                f"{self.ranks} rank(s): {self.host_total_bytes / GIB:.2f} GiB of host RAM in all")


def activation_bytes(s: Shape, u: Setup) -> int:
    per_layer = u.micro_batch * u.positions * s.hidden * ACT_BYTES_PER_TOKEN_WIDTH * u.bytes_per_weight // 2
    if u.checkpointing:  # each layer keeps its input; one layer's full set is rebuilt at a time
        return s.layers * u.micro_batch * u.positions * s.hidden * u.bytes_per_weight + per_layer
    return s.layers * per_layer


def estimate(s: Shape, u: Setup) -> Plan:
    b, n = u.bytes_per_weight, u.ranks
    whole = s.params * b
    shard = whole if u.stage < 3 or n == 1 else whole // n
    if u.stage < 3:
        gathered = 0
    elif u.offload_param or n > 1:  # the weight in use is materialised next to its shard / swap copy
        gathered = s.largest * b if u.gather_one_at_a_time else whole
    else:
        gathered = 0  # 1 rank: the shard is the whole weight, nothing to gather
    opt = 16 * u.trainable // (n if u.stage >= 1 else 1)
    device = {"weights": 0 if u.offload_param else shard, "gathered": gathered,
              "trainable_optimizer": 0 if u.offload_optimizer else opt,
              "activations": activation_bytes(s, u),
              "runtime": int(RUNTIME_GPU_DEVICE if u.on_gpu else
                             RUNTIME_CPU + RUNTIME_CPU_PER_WEIGHT_BYTE * (shard if u.offload_param != "nvme" else 0))}
    host = {"weights": shard if u.offload_param == "cpu" else 0,
            "swap_buffers": u.swap_buffer_bytes if u.offload_param == "nvme" else 0,
            "trainable_optimizer": opt if u.offload_optimizer else 0,
            "runtime": int(RUNTIME_GPU_HOST) if u.on_gpu else 0}
    plan = Plan(device=device, host=host, ranks=n, on_gpu=u.on_gpu,
                nvme_bytes=whole if u.offload_param == "nvme" else 0)
    plan.device_peak_bytes = sum(device.values())
    host_train = sum(host.values()) + (0 if u.on_gpu else plan.device_peak_bytes)
    # Loading: the weight files are mapped (RSS) next to the shard, the runtime and the swap buffers.
    held = shard if (u.offload_param != "nvme" and (not u.on_gpu or u.offload_param == "cpu")) else 0
    host_load = (RUNTIME_GPU_HOST if u.on_gpu else RUNTIME_CPU) + held + host["swap_buffers"] + u.weight_file_bytes
    host["load_mapped_files"] = u.weight_file_bytes
    plan.host_train_bytes, plan.host_load_bytes = int(host_train), int(host_load)
    plan.host_peak_bytes = max(plan.host_train_bytes, plan.host_load_bytes)
    plan.host_total_bytes = plan.host_peak_bytes * n
    return plan


def shape_of(model_config) -> Shape:
    """Exact parameter counts from a meta-device build of the backbone (shapes only, no memory)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(model_config)
    numels = [p.numel() for p in model.parameters()]
    get = lambda *names: next((getattr(model_config, k) for k in names if getattr(model_config, k, None)), 0)  # noqa: E731
    return Shape(params=sum(numels), largest=max(numels), hidden=get("hidden_size", "d_model", "n_embd"),
                 layers=get("num_hidden_layers", "n_layer", "num_layers"),
                 heads=get("num_attention_heads", "n_head"), vocab=get("vocab_size"))


def trainable_params(cfg, hidden: int, n_labels: int = 2, layers: int = 0) -> int:
    """Prompt (n·d) + linear head (d·C); InfoPrompt adds its two d×d critics and the k-wide bottleneck;
    prompt_depth=deep adds (layers - 1)·n·d."""
    n = 0 if cfg.method == "probe" else cfg.n_virtual_tokens
    t = n * hidden + hidden * n_labels
    if getattr(cfg, "prompt_depth", "input") == "deep":  # getattr: a config tree without the field
        t += max(layers - 1, 0) * n * hidden
    if cfg.uses_mi:
        t += 2 * hidden * hidden + 2 * hidden * cfg.bottleneck_dim
    return t


def weight_files_bytes(model_path: str) -> int:
    """Total size of the *.safetensors / *.bin files of a local model folder (a stat, nothing read); 0 else."""
    p = Path(model_path)
    files = [f for pat in ("*.safetensors", "*.bin") for f in p.glob(pat)] if p.is_dir() else []
    return sum(f.stat().st_size for f in files)


def setup_of(cfg, ds: dict[str, Any], ranks: int, shape: Shape, on_gpu: bool, file_bytes: int = 0) -> Setup:
    from infoprompt_ds.runtime.ds_config import ds_value

    z = lambda k: ds_value(ds, f"zero_optimization.{k}")  # noqa: E731
    half = cfg.bf16 or cfg.fp16 or bool(ds_value(ds, "bf16.enabled") is True or ds_value(ds, "fp16.enabled") is True)
    b = 2 if half else 4
    off_p = z("offload_param.device") if z("offload_param.device") in ("cpu", "nvme") else None
    off_o = z("offload_optimizer.device") if z("offload_optimizer.device") in ("cpu", "nvme") else None
    buf_size = z("offload_param.buffer_size")
    buf_size = buf_size if isinstance(buf_size, int) else max(shape.largest, shape.hidden**2, 10**6)  # as filled
    return Setup(stage=int(z("stage") or 0), ranks=ranks, micro_batch=cfg.per_device_train_batch_size,
                 positions=(0 if cfg.method == "probe" else cfg.n_virtual_tokens) + cfg.max_length,
                 bytes_per_weight=b, checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
                 offload_param=off_p, offload_optimizer=off_o,
                 gather_one_at_a_time=z("stage3_prefetch_bucket_size") == 0 and z("stage3_max_reuse_distance") == 0,
                 trainable=trainable_params(cfg, shape.hidden, layers=shape.layers), on_gpu=on_gpu,
                 swap_buffer_bytes=int(z("offload_param.buffer_count") or 5) * buf_size * b,
                 weight_file_bytes=file_bytes)


def device_memory(cfg=None) -> tuple[int, bool]:
    """(bytes of one device, is it a GPU): --device_memory_gib, else the first GPU, else this machine's RAM."""
    import torch

    on_gpu = torch.cuda.is_available()
    if cfg is not None and cfg.device_memory_gib:
        return int(cfg.device_memory_gib * GIB), on_gpu
    if on_gpu:
        return torch.cuda.get_device_properties(0).total_memory, True
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), False


# The shipped configs from cheapest to most frugal; the planner picks the first that fits.
CHOICES = ("zero2", "zero3", "zero3_offload", "zero3_nvme")


def pick(cfg, shape: Shape, ranks: int, memory: int, on_gpu: bool) -> tuple[str, bool, Plan]:
    """(shipped config, gradient_checkpointing, its plan): the first of CHOICES that fits `memory` per
    device at 90%, without checkpointing before with it (checkpointing costs ~30% more compute)."""
    from infoprompt_ds.runtime.ds_config import load_ds_config

    last = None
    for name in CHOICES:
        for ckpt in (False, True):
            c = _with(cfg, gradient_checkpointing=ckpt)
            p = estimate(shape, setup_of(c, load_ds_config(name), ranks, shape, on_gpu))
            last = (name, ckpt, p)
            if p.device_peak_bytes <= 0.9 * memory:
                return last
    return last


def _with(cfg, **over):
    import dataclasses

    known = {k: v for k, v in over.items() if k in {f.name for f in dataclasses.fields(cfg)}}
    out = dataclasses.replace(cfg, **known)
    if "gradient_checkpointing" not in known:  # a tree without the field: carry the wish as an attribute
        object.__setattr__(out, "gradient_checkpointing", over.get("gradient_checkpointing", False))
    return out


def plan_run(cfg, ds: dict[str, Any], model_config, ranks: int, strict: bool = True) -> Optional[Plan]:
    """The estimate for this run (pre-flight and `infoprompt plan`). Not strict (pre-flight): None where
    AutoModel cannot build the backbone from its config; the run's own loader may still know it."""
    from infoprompt_ds.backbone import resolve_model_path

    try:
        shape = shape_of(model_config)
    except Exception:  # noqa: BLE001 - an estimate is advice; never the reason a run fails
        if strict:
            raise
        return None
    _, on_gpu = device_memory(cfg)
    files = weight_files_bytes(resolve_model_path(cfg.model_name_or_path))
    return estimate(shape, setup_of(cfg, ds, ranks, shape, on_gpu, files))


# Llama-2 shapes for the planner's table (docs/scaling.md): no download, LlamaConfig fields only.
LLAMA2 = {"7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
          "13B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
          "70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=28672)}


def table(cfg, ranks=(1, 8, 64), gib=(24, 40, 80), tokens=(512, 2048)) -> str:
    """Markdown: the config `pick` chooses for Llama-2 7B/13B/70B per GPU count, GPU size and length."""
    from transformers import LlamaConfig

    head = ("| model | tokens | GPUs | " + " | ".join(f"{g} GB GPU" for g in gib) + " |\n|---|---|---|"
            + "---|" * len(gib))
    rows = [head]
    for name, fields in LLAMA2.items():
        shape = shape_of(LlamaConfig(vocab_size=32000, **fields))
        for t in tokens:
            for n in ranks:
                cells = []
                for g in gib:
                    ds, ckpt, p = pick(_with(cfg, max_length=t), shape, n, int(g * 10**9), on_gpu=True)
                    fits = p.device_peak_bytes <= 0.9 * g * 10**9
                    cells.append(f"{ds}{' + ckpt' if ckpt else ''} {p.device_peak_bytes / GIB:.1f}"
                                 + ("" if fits else " (does not fit)"))
                rows.append(f"| {name} | {t} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _pop_flag(argv: list[str], name: str, default: str) -> tuple[list[str], str]:
    out, value, i = [], default, 0
    while i < len(argv):
        if argv[i] == f"--{name}" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(f"--{name}="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            out.append(argv[i])
            i += 1
    return out, value


def main(argv: list[str]) -> None:
    """`infoprompt plan [train flags] [--ranks N] [--json true] [--table true]`: no weights are loaded."""
    from transformers import AutoConfig

    from infoprompt_ds.backbone import resolve_model_path
    from infoprompt_ds.config import ConfigError, one_line
    from infoprompt_ds.config_load import parse_config
    from infoprompt_ds.runtime.ds_config import load_ds_config

    argv, ranks = _pop_flag(argv, "ranks", os.environ.get("WORLD_SIZE", "1"))
    argv, as_json = _pop_flag(argv, "json", "false")
    argv, as_table = _pop_flag(argv, "table", "false")
    if not ranks.isdigit() or int(ranks) < 1:
        raise ConfigError("ranks", f"must be an integer >= 1, got {ranks!r}")
    cfg = parse_config(argv)
    if as_table.lower() == "true":
        print(table(cfg))
        return
    try:  # config.json only; DeepSpeed is not imported (its "auto" values that matter are read here)
        model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path))
    except Exception as e:
        raise ConfigError("model_name_or_path", f"cannot load {cfg.model_name_or_path!r}: {one_line(e)}")
    try:
        plan = plan_run(cfg, load_ds_config(cfg.deepspeed), model_config, int(ranks))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a config AutoModel cannot build: one line, not a traceback
        raise ConfigError("model_name_or_path", f"cannot build {model_config.model_type!r} from its config to "
                          f"count its parameters: {one_line(e)}")
    memory, on_gpu = device_memory(cfg)
    choice, ckpt, chosen = pick(cfg, shape_of(model_config), int(ranks), memory, on_gpu)
    if as_json.lower() == "true":
        print(json.dumps({**asdict(plan), "device_memory_bytes": memory,
                          "pick": {"deepspeed": choice, "gradient_checkpointing": ckpt,
                                   "device_peak_bytes": chosen.device_peak_bytes}}, indent=1))
        return
    print(plan.line())
    for where, parts in (("device", plan.device), ("host", plan.host)):
        print(f"  {where}: " + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in parts.items()))
    print(f"  for {memory / GIB:.1f} GiB per {'GPU' if on_gpu else 'host'}: --deepspeed {choice}"
          f"{' --gradient_checkpointing true' if ckpt else ''} ({chosen.device_peak_bytes / GIB:.2f} GiB per rank)")


if __name__ == "__main__":
    main(sys.argv[1:])
