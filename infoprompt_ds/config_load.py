"""Loading a TrainConfig from a YAML/JSON/TOML file and the command line (defaults < file < flags).

The fields, their help and their checks are config.py; this module only turns text into those fields.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints
from infoprompt_ds.config import ConfigError, TrainConfig, flatten_sections, section_fields


_HINTS = get_type_hints(TrainConfig)


def _base_type(tp):
    """Optional[X] -> X."""
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def _convert(name: str, value: Any) -> Any:
    """Turn a CLI string (or a YAML value) into the field's type, or raise a ConfigError naming the field."""
    tp = _HINTS[name]
    optional = get_origin(tp) is not None and type(None) in get_args(tp)
    base = _base_type(tp)
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "may not be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if get_origin(base) is list:
            if isinstance(value, str):
                try:  # a JSON list, or plain comma-separated values (which may themselves start with "[")
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    parsed = None
                value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if get_origin(base) is dict:
            if isinstance(value, str):
                if value.startswith("{"):
                    value = json.loads(value)
                else:
                    value = dict(kv.split("=", 1) for kv in value.split(",") if kv.strip())
            if not isinstance(value, dict):
                raise ValueError
            return {str(k).strip(): str(v).strip() for k, v in value.items()}
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    shown = str(base).replace("typing.", "")
    raise ConfigError(name, f"expected {getattr(base, '__name__', shown)}, got {value!r}")


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file not found: {path}")
    from infoprompt_ds.strict_load import LOADERS

    if p.suffix.lower() not in LOADERS:
        raise ConfigError("config", f"{path}: unknown format {p.suffix or '(no suffix)'}; use .yaml, .yml, .json or .toml")
    try:
        data = LOADERS[p.suffix.lower()](p.read_text(encoding="utf-8"))
    except Exception as e:  # yaml/json/unicode errors all mean the same thing to the user
        raise ConfigError("config", f"{path} is not valid {p.suffix.lstrip('.') or 'JSON'}: {str(e).splitlines()[0]}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of field: value")
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits; we want our one-line error instead
        raise ConfigError("arguments", message)


# One line per --help group: what a newcomer looks for there.
SECTION_HELP = {
    "model": "the frozen backbone: a packaged name, a local HF folder, a hub name or a *.gguf file",
    "data": "the task and its data: a preset (--task/--dataset) or local files; few-shot sampling and splits",
    "method": "InfoPrompt (--method infoprompt) or vanilla prompt tuning (prompt): prompt, read-out, MI terms",
    "optimization": "seed, learning rate, batch sizes, steps, precision",
    "evaluation": "when to evaluate, log and checkpoint; which weights are tested; the output folder",
    "tracking": "MLflow: experiment, run name, system metrics (the store: MLFLOW_TRACKING_URI, else beside "
                "output_dir)",
    "scale": "DeepSpeed and the process group: the ZeRO json, offload, memory budget, timeouts",
}

EXAMPLES = """examples:
  deepspeed train.py --deepspeed ds_configs/zero3.json                  the default job (~2 min on 2 CPU cores)
  deepspeed train.py --deepspeed ds_configs/zero3.json --config configs/ner_conll.yaml --seed 3
  deepspeed --num_gpus 8 train.py --deepspeed zero3_offload --model_name_or_path DIR --method prompt
A config file's keys are the flags' names (configs/*.yaml); a flag overrides the file."""


def _default_text(f) -> str:
    """' (default: x)' unless the help already says it (or there is none to say)."""
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if default is None or default == "" or "default" in f.metadata.get("help", "").lower():
        return ""
    return f" (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    # The usage line names the shape, not all ~80 flags: the groups below list them.
    parser = _Parser(prog="train.py", usage="[deepspeed] train.py [--config FILE] [--FIELD VALUE ...]",
                     allow_abbrev=False, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Train a soft prompt (InfoPrompt or vanilla prompt tuning) on a frozen,\n"
                                 "ZeRO-3-sharded backbone; every run is tracked in MLflow.")
    parser.add_argument("--config", help=(
        "YAML/JSON/TOML file of field: value, flat or nested under the group names below "
        "(model, data, method, optimization, evaluation, tracking, scale); command-line flags override it."))
    by_name = {f.name: f for f in fields(TrainConfig)}
    for section, names in section_fields().items():
        group = parser.add_argument_group(section, SECTION_HELP.get(section))
        for name in names:
            f = by_name[name]
            text = (f.metadata.get("help", "") + _default_text(f)).replace("%", "%%")
            group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, help=text.strip())
    return parser


def _did_you_mean(name: str, prefix: str = "") -> str:
    """' (did you mean --lr?)' for a near-miss field name (difflib's ratio, as Python's own NameError hints)."""
    import difflib

    close = difflib.get_close_matches(name.replace("-", "_"), list(_HINTS) + ["config"], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """CLI → TrainConfig. Order of precedence: defaults < --config file < flags."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        raise ConfigError(name, f"unknown option {flag!r}{_did_you_mean(name, '--')}; see --help for the fields")
    values: dict[str, Any] = {}
    cli = vars(args)
    if cli.get("config"):
        path = cli.pop("config")
        for key, value in flatten_sections(load_config_file(path), path).items():
            if key not in _HINTS:
                raise ConfigError(key, f"unknown config key{_did_you_mean(key)}; see --help for the fields")
            values[key] = _convert(key, value)  # a bad value in the file is an error even if a flag overrides it
    cli.pop("config", None)
    values.update(cli)
    return TrainConfig(**{k: _convert(k, v) for k, v in values.items()})


def config_from_env_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment; single process when unset."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))
