"""A persistent cache of the unprompted representation z(x, no prompt), shared across runs.

The backbone is frozen and runs in eval mode, so z(x, ∅) is a pure function of (backbone weights and
config, tokenizer, max_length, pooling, compute dtype, device type) and the example's model inputs.
Runs that share those (seeds, methods, sweeps over one backbone + data) can reuse each other's z.

One file per backbone key: `<cache_dir>/<backbone_key>.safetensors` with `keys` (uint8 [N, 32], the
sha256 of each example's model inputs) and `z` (float32 [N, d]); its metadata holds the JSON the key was
made from, for humans. Loaded with safetensors only (no pickle). Written by one process (rank 0),
atomically: a crash mid-write leaves the old file intact. Two runs writing at the same time merge into
what was on disk when each wrote, so at worst one loses the other's new rows (last writer wins); a lost
row is only recomputed by a later run, never wrong.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

import torch.distributed as dist

from infoprompt_ds.config import one_line
from infoprompt_ds.runtime.distributed import no_grad_pass
from infoprompt_ds.io import atomic_file

# Bump when the file layout or what goes into a key changes: old files then simply stop matching.
FORMAT_VERSION = 1
KEY_BYTES = 32  # sha256
# Files that hold weights, in any format from_pretrained reads (sharded ones come with an index json).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _model_folder(resolved: str) -> Optional[Path]:
    """The folder the backbone was loaded from: the path itself, or the hub cache's snapshot folder
    (named by the commit, so a new upload of the model is a new folder)."""
    if Path(resolved).is_dir():
        return Path(resolved)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(resolved, "config.json")
        return Path(found).parent if isinstance(found, str) else None
    except Exception:  # not a hub name, or no hub client: the key still has the name and the config
        return None


def _weights_fingerprint(folder: Optional[Path]) -> Any:
    """Name, size and mtime of every weight file, not a hash of the bytes: reading multi-GB weights on
    every run would cost more than the cache saves. Rewriting or re-copying a file changes its mtime,
    which makes a miss (safe); only an in-place edit that keeps size and mtime would go unnoticed."""
    if folder is None:
        return "unresolved"
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            st = p.stat()  # follows the hub cache's symlinks to the blobs
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_fingerprint(tokenizer, folder: Optional[Path]) -> str:
    """What turns text into ids. A fast tokenizer serialises itself; its transient truncation/padding
    state (set by the last call) is dropped so that a used and a fresh tokenizer hash the same. A slow
    one is hashed by the files in its folder. (The per-example key hashes the ids themselves, so this is
    a second line of defence.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        return "fast:" + _sha256(json.dumps(state, sort_keys=True))
    h = hashlib.sha256()
    src = Path(getattr(tokenizer, "name_or_path", "") or "")
    src = src if src.is_dir() else folder
    names = set(getattr(tokenizer, "vocab_files_names", {}).values()) | {
        "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
    for name in sorted(names):
        if src is not None and (src / name).is_file():
            h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return "files:" + h.hexdigest()


def key_fields(cfg, model, tokenizer, device_type: str = "cpu") -> dict[str, Any]:
    """Everything z(x, ∅) depends on besides the example itself. `model` is the InfoPromptModel (its
    pooling is the resolved one: auto has become cls/last/mean/markers). The device type is in it too:
    CPU and GPU kernels round differently (by more than that in bf16), so their z are not exchangeable."""
    from infoprompt_ds.backbone import resolve_model_path

    resolved = resolve_model_path(cfg.model_name_or_path)
    folder = _model_folder(resolved)
    return {"format": FORMAT_VERSION, "backbone": resolved,
            "model_folder": str(folder.resolve()) if folder is not None else None,
            # The config JSON carries transformers_version: a new transformers may compute differently.
            "config": model.backbone.config.to_json_string(),
            "weights": _weights_fingerprint(folder),
            "tokenizer": _tokenizer_fingerprint(tokenizer, folder),
            "max_length": cfg.max_length, "pooling": model.pooling,
            # the read-out's template/cue are in the example's ids too; cloze's z is the MLM transform's
            "readout": model.readout.meta(),
            "dtype": cfg.precision, "device": device_type,
            # bf16 on a CPU runs attention by the math path since model.pick_attention_kernel: z computed
            # by the flash kernel before that rounds differently and is not reused (other keys unchanged)
            **({"attention": "math"} if cfg.precision == "bf16" and device_type == "cpu" else {})}


def key_of(fields: dict[str, Any]) -> str:
    return _sha256(json.dumps(fields, sort_keys=True))


def backbone_key(cfg, model, tokenizer, device_type: str = "cpu") -> str:
    """The cache file's name: sha256 of key_fields. Pass the device type the backbone runs on."""
    return key_of(key_fields(cfg, model, tokenizer, device_type))


def example_key(example: dict) -> bytes:
    """sha256 of exactly the inputs the unprompted forward reads (InfoPromptModel.unprompted via
    model_inputs: input_ids, attention_mask, token_type_ids, entity_pos), unpadded: a changed text or
    tokenization is a miss, never a stale hit. Labels and idx are left out: they do not change z."""
    from infoprompt_ds.method.model import MODEL_INPUTS

    used = {k: example[k] for k in MODEL_INPUTS if k in example and example[k] is not None}
    used = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in used.items()}
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).digest()


def cache_path(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"{key}.safetensors"


def warn(message: str) -> None:
    print(f"warning: [cache] {message}", file=sys.stderr, flush=True)


def load_cache(path: Path, key: str, dim: int, quiet: bool = False) -> dict[bytes, torch.Tensor]:
    """{example key: z row}. A missing file is an empty cache; one that cannot be read or does not hold
    what its name promises (truncated, garbage, another key, another width) is treated as empty with a
    one-line warning: the run then computes everything and the write replaces the bad file."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # safetensors only: nothing is unpickled
            meta = f.metadata() or {}
            # Copies: get_tensor maps the file, and a tensor backed by a file that is edited in place
            # (not our os.replace, but a copy tool or a person) would change under us, or fault.
            keys, z = f.get_tensor("keys").clone(), f.get_tensor("z").clone()
        if meta.get("backbone_key") != key:
            raise ValueError(f"it holds key {meta.get('backbone_key')!r}")
        if keys.dtype != torch.uint8 or keys.dim() != 2 or keys.shape[1] != KEY_BYTES:
            raise ValueError(f"keys has dtype {keys.dtype} and shape {tuple(keys.shape)}")
        if z.dtype != torch.float32 or z.dim() != 2 or z.shape != (keys.shape[0], dim):
            raise ValueError(f"z has dtype {z.dtype} and shape {tuple(z.shape)}, expected [{keys.shape[0]}, {dim}]")
    except Exception as e:
        if not quiet:
            warn(f"ignoring unreadable cache file {path} ({one_line(e)}); it will be rewritten")
        return {}
    raw = keys.numpy().tobytes()
    return {raw[i * KEY_BYTES:(i + 1) * KEY_BYTES]: z[i] for i in range(len(z))}


def save_cache(path: Path, key: str, fields: dict[str, Any], rows: dict[bytes, torch.Tensor], dim: int) -> int:
    """Merge `rows` into what is on disk now (re-read, so rows another run added since our load are kept)
    and replace the file atomically: a temporary file in the same folder, fsync, os.replace. Returns the
    row count written. A failed write (read-only or full disk) is a warning: the run does not need it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = load_cache(path, key, dim, quiet=True)  # a bad file was reported at load: replaced now
        new = {k: v for k, v in rows.items() if k not in merged}  # an existing row stays: no churn
        if not new and path.is_file() and merged:
            return len(merged)
        merged.update(new)
        from safetensors.torch import save_file

        keys = torch.frombuffer(bytearray(b"".join(merged)), dtype=torch.uint8).reshape(-1, KEY_BYTES) \
            if merged else torch.zeros(0, KEY_BYTES, dtype=torch.uint8)
        z = torch.stack(list(merged.values())).float().contiguous() if merged else torch.zeros(0, dim)
        with atomic_file(path) as tmp:
            save_file({"keys": keys, "z": z}, str(tmp), metadata={
                "backbone_key": key, "format": str(FORMAT_VERSION), "key_fields": json.dumps(fields, sort_keys=True)})
        return len(merged)
    except Exception as e:
        warn(f"could not write {path} ({one_line(e)}); continuing without")
        return 0


# --- the protocol a run follows (collective: every rank calls compute_unprompted) -------------------------

def compute_unprompted(engine, split, collate, cfg, world: int, rank: int, device, tokenizer, tracker,
                       step: int) -> torch.Tensor:
    """z(x, no prompt) for every training example, once: the backbone is frozen, so it never changes.
    Each rank computes a shard and all ranks receive all of it. With `unprompted_cache_dir`, rows that
    an earlier run computed for the same backbone key come from the persistent cache instead."""
    from infoprompt_ds.method.model import model_inputs

    def rows_of(batch):
        z = engine(**model_inputs(batch), unprompted_only=True)["z"]
        return list(zip(batch["idx"].tolist(), z.float().cpu()))

    if cfg.unprompted_cache_dir:
        return _unprompted_from_cache(engine, split, collate, cfg, world, rank, device, rows_of, tokenizer,
                                      tracker, step)
    cache = dict(no_grad_pass(engine, split, collate, cfg.per_device_eval_batch_size, world, rank, device, rows_of))
    return torch.stack([cache[i] for i in range(len(split))]).to(device)


def _unprompted_from_cache(engine, split, collate, cfg, world: int, rank: int, device, rows_of, tokenizer,
                           tracker, step: int) -> torch.Tensor:
    """Rank 0 reads the cache (other nodes may not share its file system) and sends every rank the hit
    indices and their rows; all ranks then compute only the misses, sharded as usual, and rank 0 merges
    them into the cache file. The result is the tensor compute_unprompted returns without a cache."""
    n, dim = len(split), engine.module.backbone.config.hidden_size
    key = path = None
    hit_idx: list[int] = []
    if rank == 0:
        try:
            fields = key_fields(cfg, engine.module, tokenizer, device.type)
            key = key_of(fields)
            path = cache_path(cfg.unprompted_cache_dir, key)
            ex_keys = [example_key(split[i]) for i in range(n)]
            stored = load_cache(path, key, dim)
            hit_idx = [i for i, k in enumerate(ex_keys) if k in stored]
        except Exception as e:  # rank 0 must still reach the broadcast, or the other ranks would hang
            warn(f"disabled for this run: {type(e).__name__}: {one_line(e)}")
            key, hit_idx = None, []
    agreed = [hit_idx]
    dist.broadcast_object_list(agreed, src=0)  # every rank must run the same misses (ZeRO-3 collectives)
    hit_idx = agreed[0]
    z_hit = torch.empty(len(hit_idx), dim, dtype=torch.float32)
    if rank == 0 and hit_idx:
        z_hit = torch.stack([stored[ex_keys[i]] for i in hit_idx]).float()
    if hit_idx:
        z_hit = z_hit.to(device)
        dist.broadcast(z_hit, src=0)
    z = torch.empty(n, dim, dtype=torch.float32)
    if hit_idx:
        z[torch.tensor(hit_idx, dtype=torch.long)] = z_hit.cpu()
    hits = set(hit_idx)
    missing = [i for i in range(n) if i not in hits]
    if missing:  # the same decision on every rank: the hit set was agreed above
        subset = [split[i] for i in missing]  # each keeps its "idx", the row of the full split
        for i, row in no_grad_pass(engine, subset, collate, cfg.per_device_eval_batch_size, world, rank, device,
                                   rows_of):
            z[i] = row
    if rank == 0 and key is not None:
        total = save_cache(path, key, fields, {ex_keys[i]: z[i] for i in missing}, dim) if missing else len(stored)
        print(f"[cache] z(x, no prompt): {len(hit_idx)}/{n} hits from {path} ({len(missing)} computed; "
              f"the file holds {total} rows)", flush=True)
        if tracker is not None:
            tracker.set_tags({"unprompted_cache.key": key})
            tracker.log_metrics({"train/unprompted_cache_hits": float(len(hit_idx))}, step)
    return z.to(device)
