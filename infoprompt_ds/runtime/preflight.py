"""Pre-flight checks that need the environment, the DeepSpeed json, the file system or the tokenizer, but
no weights and no process group: each one is a crash (or a silent waste) that used to happen minutes
later, after the model had loaded. Called from train_loop.prepare; every failure is a ConfigError.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from infoprompt_ds.config import ConfigError, TrainConfig
from infoprompt_ds.runtime.ds_config import ds_value

# Optimizers whose DeepSpeed kernels exist only on CUDA (fused Lamb, 1-bit compression).
_GPU_ONLY_OPTIMIZERS = ("lamb", "onebitadam", "onebitlamb", "zerooneadam")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "sentencepiece.model")


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line for the job, not one per rank
        print(f"warning: {message}", flush=True)


def check_launcher_env() -> None:
    """A stray RANK or WORLD_SIZE left in the shell (without a launcher's other variables) used to end in
    DeepSpeed's MPI discovery and an mpi4py traceback."""
    env = os.environ
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise ConfigError("environment", f"{have}={env[have]} is set but {lack} is not: unset {have} for a "
                          f"one-process run, or start with a launcher (deepspeed, torchrun, srun)")
    if "RANK" not in env:
        return
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise ConfigError("environment", f"RANK={env['RANK']!r} and WORLD_SIZE={env['WORLD_SIZE']!r} must be integers")
    if not (world >= 1 and 0 <= rank < world):
        raise ConfigError("environment", f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(v)]
    if missing:
        raise ConfigError("environment", f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start with a "
                          f"launcher, or unset RANK/WORLD_SIZE for a one-process run")


_get = ds_value  # a dotted path of the DeepSpeed json (ds_config.ds_value)


def check_precision_and_devices(cfg: TrainConfig, ds: dict[str, Any]) -> None:
    import torch

    for name in ("bf16", "fp16"):
        enabled = _get(ds, f"{name}.enabled")
        if isinstance(enabled, bool) and enabled != getattr(cfg, name):
            raise ConfigError(name, f"the DeepSpeed json sets {name}.enabled={str(enabled).lower()} but --{name} is "
                              f"{str(getattr(cfg, name)).lower()}; make them agree (or write \"auto\" in the json)")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and (cfg.fp16 or _get(ds, "fp16.enabled") is True):
        raise ConfigError("fp16", "fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 training); on CPU "
                          "use --bf16 true or fp32")
    opt = _get(ds, "optimizer.type")
    if not on_gpu and isinstance(opt, str) and opt.lower() in _GPU_ONLY_OPTIMIZERS:
        raise ConfigError("deepspeed", f"optimizer.type {opt} needs a GPU (its DeepSpeed kernel is CUDA-only); on "
                          f"CPU use AdamW")
    for part in ("offload_param", "offload_optimizer"):
        device = _get(ds, f"zero_optimization.{part}.device")
        if device == "nvme" and not _get(ds, f"zero_optimization.{part}.nvme_path"):
            raise ConfigError("deepspeed", f"zero_optimization.{part}.device is nvme but nvme_path is not set; "
                              f"set nvme_path to a folder on the NVMe drive")


LIBAIO_HINT = ("install libaio and its headers (Debian/Ubuntu: apt-get install -y libaio-dev; RHEL/Fedora: "
               "yum install -y libaio-devel), or use --deepspeed zero3_offload (offload to CPU RAM, no libaio)")


def libaio_missing_message(part: str) -> str:
    return (f"zero_optimization.{part}.device is nvme, and DeepSpeed's async I/O op (async_io) cannot be built "
            f"here: libaio was not found; {LIBAIO_HINT}")


def nvme_parts(ds: dict[str, Any]) -> list[str]:
    return [part for part in ("offload_param", "offload_optimizer")
            if _get(ds, f"zero_optimization.{part}.device") == "nvme"]


def _writable_parent(path: Path, name: str) -> Path:
    """The nearest existing folder of `path`, checked by creating a file in it (root passes os.access on a
    read-only mount; a real file does not)."""
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(name, f"{path} lies under {parent}, which is a file")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise ConfigError(name, f"cannot write in {parent}: {e.strerror or e}")
    return parent


def check_offload(cfg: TrainConfig, ds: dict[str, Any], nvme_bytes: int = 0) -> None:
    """ZeRO-Infinity (offload to nvme): the swap folder must be writable with room for the swapped
    weights, and DeepSpeed's async_io op must be buildable (it links libaio), or the run dies in
    deepspeed.initialize after the model has loaded. `nvme_bytes`: what the swap will hold (plan.py)."""
    parts = nvme_parts(ds)
    if not parts:
        return
    for part in parts:
        where = Path(_get(ds, f"zero_optimization.{part}.nvme_path"))
        parent = _writable_parent(where, "offload_dir")
        free = shutil.disk_usage(parent).free
        if nvme_bytes * 1.05 > free:
            raise ConfigError("offload_dir", f"{where} has {free / 2**30:.1f} GiB free but the swap files need "
                              f"~{nvme_bytes / 2**30:.1f} GiB; free space or give another --offload_dir")
    from deepspeed.accelerator import get_accelerator

    # The op the accelerator would build (the CPU accelerator has its own builder); is_compatible()
    # compiles and links a test program against libaio (io_submit).
    if not get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible():
        raise ConfigError("deepspeed", libaio_missing_message(parts[0]))


def _has_swap_files(where: Path) -> bool:
    """False when the folder is gone, or is being deleted while we look (rglob then meets a vanished
    subfolder: FileNotFoundError, seen in CI while the test's rmtree was still running)."""
    try:
        return where.is_dir() and any(where.rglob("*.swp"))
    except OSError:
        return False


def _free_bytes(where: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(where).free
    except OSError:  # deleted since _has_swap_files looked
        return None


def offload_fault(cfg: TrainConfig, error: BaseException) -> Optional[ConfigError]:
    """A crash inside DeepSpeed's swapper (a bare AssertionError from its async read) whose cause is the
    swap folder: gone, or full. One line naming it and the way back, instead of a traceback (issue 34
    item 7). None when the swap folder is not the cause."""
    import errno

    from infoprompt_ds.runtime.checkpoint import checkpoint_root, complete_checkpoints
    from infoprompt_ds.runtime.ds_config import load_ds_config, offload_dir

    try:
        ds = load_ds_config(cfg.deepspeed)
    except ConfigError:
        return None
    done = complete_checkpoints(checkpoint_root(cfg.output_dir))
    last = f"the last complete checkpoint is {done[-1].name}" if done else "no checkpoint was completed"
    for part in nvme_parts(ds):
        where = _get(ds, f"zero_optimization.{part}.nvme_path")
        where = Path(offload_dir(cfg) if where == "auto" else where)
        if not _has_swap_files(where):
            return ConfigError("offload_dir", f"{where} (the NVMe swap files) vanished during training ({type(error).__name__} "
                               f"in DeepSpeed's swapper); {last}; resume with --resume_from_checkpoint latest and an "
                               f"--offload_dir that stays")
        e: Optional[BaseException] = error
        while e is not None and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
            e = e.__cause__ or e.__context__
        if e is not None or _free_bytes(where) == 0:
            return ConfigError("offload_dir", f"{where} is full (the NVMe swap files could not be written); {last}; "
                               f"free space or give another --offload_dir, then resume with --resume_from_checkpoint latest")
        tb = error.__traceback__
        while tb is not None and "swap_tensor" not in tb.tb_frame.f_code.co_filename:
            tb = tb.tb_next
        if tb is not None:  # raised in DeepSpeed's swapper: part of the files went (a deletion caught mid-way)
            return ConfigError("offload_dir", f"the NVMe swap files in {where} could not be read back ({type(error).__name__} "
                               f"in DeepSpeed's swapper: deleted or damaged during training); {last}; resume with "
                               f"--resume_from_checkpoint latest and an --offload_dir that stays")
    return None


def check_gradient_checkpointing(cfg: TrainConfig, model_config, readout_kind: str) -> None:
    """--gradient_checkpointing on a model class that cannot checkpoint (transformers'
    supports_gradient_checkpointing False: ALBERT, MPNet, XLNet, CTRL...) used to fail only after loading."""
    if not cfg.gradient_checkpointing:
        return
    from infoprompt_ds.data.readout import auto_class
    from infoprompt_ds.internals import checkpointing_layer_class, model_class_for

    cls = model_class_for(auto_class(readout_kind), model_config)
    if cls is None:  # not a class transformers maps: from_pretrained reports it
        return
    import sys

    base = checkpointing_layer_class()
    per_layer = base is not None and any(isinstance(v, type) and issubclass(v, base) and v is not base
                                         for v in vars(sys.modules[cls.__module__]).values())
    if not (getattr(cls, "supports_gradient_checkpointing", False) and per_layer):
        raise ConfigError("gradient_checkpointing", f"{cls.__name__} ({model_config.model_type}) cannot checkpoint "
                          f"activations (transformers has no per-layer checkpointing for it); drop "
                          f"--gradient_checkpointing or pick another backbone")


def report_plan(cfg: TrainConfig, plan) -> None:
    """The planner's estimate as one line (rank 0), and a warning when it exceeds the device's memory
    (on CPU: the host's RAM, which all ranks of this node share)."""
    from infoprompt_ds.runtime.plan import GIB, device_memory

    if plan is None or os.environ.get("RANK", "0") != "0":
        return
    print(plan.line(), flush=True)
    memory, on_gpu = device_memory(cfg)
    need = plan.device_peak_bytes if on_gpu else plan.host_total_bytes
    if need > memory:
        _warn(f"the plan needs {need / GIB:.1f} GiB per {'GPU' if on_gpu else 'host'} but it has {memory / GIB:.1f} "
              f"GiB; expect an out-of-memory kill (`infoprompt plan` with the same flags suggests a config)")


def check_output_dir_path(cfg: TrainConfig) -> None:
    """output_dir "" (the current folder), under a file, or somewhere this user cannot write."""
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir", "is empty; name a folder (e.g. outputs/run)")
    out = Path(cfg.output_dir)
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != out and not parent.is_dir():
        raise ConfigError("output_dir", f"{out} lies under {parent}, which is a file")
    if parent.is_dir():
        try:  # os.access says yes to root on a read-only mount; creating a file is the real test
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            raise ConfigError("output_dir", f"cannot write in {parent}: {e.strerror or e}")


def _hub_reachable(timeout: float = 3.0) -> Optional[str]:
    """None when the hub endpoint accepts a TCP connection, else why not (env.hub_unreachable)."""
    from infoprompt_ds.env import hub_unreachable

    return hub_unreachable(timeout)


def check_model_path(cfg: TrainConfig) -> None:
    from infoprompt_ds.backbone import did_you_mean, resolve_model_path

    name = resolve_model_path(cfg.model_name_or_path)
    p = Path(name).expanduser()
    if p.is_file():
        raise ConfigError("model_name_or_path", f"{name} is a file; give the model folder (config.json, weights and "
                          f"tokenizer files) or a hub name")
    if p.is_dir():
        if (p / "config.json").is_file() and not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError("model_name_or_path", f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                              f"...); save the tokenizer there too (tokenizer.save_pretrained)")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError("model_name_or_path", f"{name} not found (no such folder){did_you_mean(name)}")
    try:  # a hub name: fine when cached; else fail now rather than after the hub client's retries
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - an invalid repo id: from_pretrained gives the precise message
        return
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    why = f"{offline[0]} is set" if offline else _hub_reachable()
    if why:
        raise ConfigError("model_name_or_path", f"{name!r} is not a local folder nor in the Hugging Face cache, and "
                          f"{why}; give a local model folder{did_you_mean(name)}")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a .safetensors file cannot load, from its header alone (8-byte length, JSON, data offsets): a
    truncated copy is named in milliseconds instead of after the engine is built."""
    import json
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100 * 2**20):
                return "its header is damaged"
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "its header is damaged"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        return f"it is truncated ({size} bytes, its header says {8 + n + end})"
    return None


def _bin_problem(path: Path) -> Optional[str]:
    import zipfile

    with open(path, "rb") as f:
        legacy = f.read(2) not in (b"PK",)
    if legacy:  # the pre-1.6 torch format: only an empty file is known bad without unpickling
        return "it is empty" if path.stat().st_size == 0 else None
    try:
        zipfile.ZipFile(path).close()  # reads the central directory at the end: gone when truncated
    except (zipfile.BadZipFile, OSError):
        return "it is truncated or damaged (not a complete zip archive)"
    return None


def check_weight_files(cfg: TrainConfig) -> None:
    """A local backbone folder must hold complete weights before anything is written (issue 34 item 5):
    from_pretrained found a missing or truncated file only after 30-40 s, with the output folder made."""
    import json

    from infoprompt_ds.backbone import resolve_model_path

    folder = Path(resolve_model_path(cfg.model_name_or_path)).expanduser()
    if not folder.is_dir():
        return  # a hub name: from_pretrained resolves (and checks) the cached files
    present = [f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        raise ConfigError("model_name_or_path", f"{folder} has no weight files ({', '.join(WEIGHT_FILES[::2])} or a "
                          f"sharded index); save the model there (model.save_pretrained)")
    files = [folder / present[0]]
    if present[0].endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(files[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError("model_name_or_path", f"{files[0]} is not a weight index (no weight_map); save the "
                              f"model again")
        files = [folder / s for s in shards]
    for f in files:
        problem = "it is missing" if not f.is_file() else \
            _safetensors_problem(f) if f.suffix == ".safetensors" else _bin_problem(f)
        if problem:
            raise ConfigError("model_name_or_path", f"weight file {f} cannot load: {problem}; copy or save the model "
                              f"again")


def check_tokenizer(cfg: TrainConfig, tokenizer) -> None:
    """Limits that only the tokenizer knows: what max_length must leave room for, and that the prompt's
    init text gives tokens."""
    pair = cfg.text_pair_column is not None
    need = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if cfg.max_length < need:
        raise ConfigError("max_length", f"{cfg.max_length} leaves no room for text: this tokenizer adds "
                          f"{need - (2 if pair else 1)} special tokens{' to a pair' if pair else ''}; use >= {need}")
    if cfg.prompt_init == "text" and not tokenizer(cfg.prompt_init_text or "", add_special_tokens=False)["input_ids"]:
        raise ConfigError("prompt_init_text", f"{cfg.prompt_init_text!r} gives no tokens; use a text with words")


def check_label_words(task, tokenizer) -> None:
    """Each label word must give tokens the tokenizer knows: an empty word makes a NaN head row, and words
    that are all [UNK] start every class from the same row."""
    if not task.label_words:
        return
    names = task.labels
    from infoprompt_ds.data.tasks import word_ids

    unk, unknown = tokenizer.unk_token_id, []
    for name in names:
        word = task.label_words.get(name, "")
        ids = word_ids(tokenizer, word) if word.strip() else []
        if not ids:
            raise ConfigError("label_words", f"the word for label {name!r} is empty; give a word, e.g. {name}=good")
        if unk is not None and all(i == unk for i in ids):
            unknown.append(f"{name}={word}")
    # A warning, not an error: a preset's words (yes/no, good/bad) may be missing from a small vocabulary,
    # and the head still trains from identical rows; the user should know its init means nothing.
    if unknown and len(unknown) == len(names):
        _warn(f"label_words: every label word is unknown to the tokenizer ({', '.join(unknown)} are all "
              f"[UNK]): every class starts from the same head row; use words of its vocabulary")
    elif unknown:
        _warn(f"label_words: {', '.join(unknown)} unknown to the tokenizer ([UNK]); those classes start "
              f"from the [UNK] embedding")


def check_validation_labels(data) -> None:
    """A validation split with one class makes mcc/f1 constant: best-model selection would mean nothing."""
    task = data.task
    if task.type != "classification" or "validation" not in data.splits:
        return
    classes = set(data.splits["validation"]["labels"])
    if len(classes) < 2 and task.metric in ("mcc", "f1", "macro_f1"):
        _warn(f"metric_for_best_model: the validation split holds one class only "
              f"({data.label_names[next(iter(classes))]!r}), so {task.metric} is constant and picks "
              f"no best model; give a validation_file with every class or use accuracy")
