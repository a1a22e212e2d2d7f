"""A sweep's YAML spec -> its grid cells (SweepSpec, Cell, expand) and each cell's command line.

Running the cells as MLflow child runs is compare/sweep.py; the YAML format is in docs/tracking.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from infoprompt_ds.config import ConfigError, flatten_sections
from infoprompt_ds.config_load import load_config_file, parse_config
from infoprompt_ds.tracking.run_metadata import non_identity_fields, run_name_for
from infoprompt_ds.tracking.store import SWEEPS_ROOT, default_store


# Fields the sweep sets itself for every cell.
RESERVED = ("output_dir", "run_name", "mlflow_experiment", "resume_from_checkpoint", "overwrite_output_dir",
            "local_rank")


EXIT_PREEMPTED = 75


@dataclass
class SweepSpec:
    name: str
    experiment: str
    output_root: Path
    launcher: list[str]
    tracking_uri: Optional[str]
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    source: Optional[Path] = None
    run_timeout_s: Optional[float] = None


@dataclass
class Cell:
    values: dict[str, Any]  # this cell's grid values, in grid order
    args: dict[str, str]  # every CLI flag of its training (base + cell + the sweep's own)

    @property
    def cell_id(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values.items())

    @property
    def group_id(self) -> str:
        """The cell without its seed: runs that differ only in seed form one group."""
        return ",".join(f"{k}={v}" for k, v in self.values.items() if k != "seed") or "all"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(f"{k}={v}" for k, v in self.values.items())) or "run"

    @property
    def args_hash(self) -> str:
        # Not hashed: fields marked "identity": False in TrainConfig (where it writes, logging, caches...).
        skip = non_identity_fields()
        ident = {k: v for k, v in sorted(self.args.items()) if k not in skip}
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Outcome:
    cell: Cell
    status: str  # FINISHED | SKIPPED | FAILED | KILLED
    run_id: Optional[str] = None
    seconds: float = 0.0
    returncode: Optional[int] = None
    scores: dict[str, float] = field(default_factory=dict)  # best validation and test metric (metrics.json)


@dataclass
class SweepResult:
    parent_run_id: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.status in ("FINISHED", "SKIPPED") for o in self.outcomes)


def _cli_value(v: Any) -> str:
    """A YAML value as the training CLI parses it."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("set", f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def packaged_sweep(path: str) -> str:
    """`rt_64shot` or `sweeps/rt_64shot.yaml` outside a checkout: the example the package ships (what
    `infoprompt --help` names); any existing file, or an unknown name, is returned unchanged."""
    if Path(path).is_file():
        return path
    shipped = Path(__file__).resolve().parents[1] / "sweeps" / Path(path).name
    for candidate in (shipped, shipped.with_name(shipped.name + ".yaml")):
        if candidate.is_file():
            return str(candidate)
    return path


def load_spec(path: str, overrides: Optional[dict[str, Any]] = None, tracking_uri: Optional[str] = None,
              output_root: Optional[str] = None) -> SweepSpec:
    from infoprompt_ds.config_load import _HINTS

    path = packaged_sweep(path)
    raw = load_config_file(path)
    known = {"name", "experiment", "output_root", "launcher", "tracking_uri", "base", "grid", "run_timeout_s"}
    for key in raw:
        if key not in known:
            raise ConfigError(key, f"unknown sweep key in {path}; expected {', '.join(sorted(known))}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base", "must be a mapping of training field: value")
    base = {**flatten_sections(base, path), **(overrides or {})}  # flat, or nested by config section
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("grid", "must be a non-empty mapping of training field: [values]")
    for key in list(base) + list(grid):
        if key not in _HINTS:
            raise ConfigError(key, "is not a training field; see `python train.py --help`")
        if key in RESERVED:
            raise ConfigError(key, "is set by the sweep for each run; remove it from the sweep file")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", f"must be a non-empty list, got {values!r}")
        if len(set(map(_cli_value, values))) != len(values):
            raise ConfigError(f"grid.{key}", f"has duplicate values: {values}")
        if key in base:
            raise ConfigError(key, "is both in base and in grid")
    launcher = raw.get("launcher", "python")
    if isinstance(launcher, str):
        launcher = [sys.executable] if launcher.strip() == "python" else shlex.split(launcher)
    if not isinstance(launcher, list) or not launcher or not all(isinstance(x, str) for x in launcher):
        raise ConfigError("launcher", "must be 'python', a command string or a list of strings")
    name = str(raw.get("name") or Path(path).stem)
    experiment = str(raw.get("experiment") or name)
    root = Path(output_root or raw.get("output_root") or SWEEPS_ROOT / name)
    timeout = raw.get("run_timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError("run_timeout_s", f"must be a number > 0, got {timeout!r}")
    return SweepSpec(name=name, experiment=experiment, output_root=root.resolve(), launcher=launcher,
                     tracking_uri=tracking_uri or raw.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
                     base=base, grid=grid, source=Path(path).resolve(), run_timeout_s=timeout)


def expand(spec: SweepSpec) -> list[Cell]:
    """Every grid cell, each checked by the training's own config parser (bad input fails here, in ms)."""
    keys = list(spec.grid)
    # Seeds vary slowest: a sweep stopped half-way has every method on the first seeds, which compare can
    # already pair, instead of all seeds of one method and none of the other.
    order = sorted(keys, key=lambda k: k != "seed")
    cells = []
    for combo in itertools.product(*(spec.grid[k] for k in order)):
        values = {k: dict(zip(order, combo))[k] for k in keys}
        args = {k: _cli_value(v) for k, v in {**spec.base, **values}.items()}
        cell = Cell(values=values, args=args)
        args.update(output_dir=str(spec.output_root / cell.slug), mlflow_experiment=spec.experiment)
        cfg = parse_config(to_argv(args))  # raises ConfigError naming the field
        # What tells the cells apart first (infoprompt-s0-k64-lr=0.01-minilm-rt): method, seed, k, then the
        # grid values the name does not show yet, before backbone and task, which a sweep rarely varies.
        extra = [f"{k}={v}" for k, v in values.items() if k not in ("method", "seed", "k_shot")]
        args["run_name"] = run_name_for(cfg, tuple(re.sub(r"[^A-Za-z0-9_.=]+", "_", x) for x in extra))
        cells.append(cell)
    return cells


def to_argv(args: dict[str, str]) -> list[str]:
    return [x for k, v in args.items() for x in (f"--{k}", v)]


def resolve_uri(spec: SweepSpec) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment): the sweep file's tracking_uri, else
    tracking.default_store(output_root) (MLFLOW_TRACKING_URI, else <output_root>/mlflow.db). Every
    training of the sweep gets this URI, and `compare --sweep NAME|FOLDER` finds it there."""
    if spec.tracking_uri:
        return spec.tracking_uri, None
    store = default_store(spec.output_root)
    return store.uri, store.artifact_location
