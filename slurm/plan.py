"""Resolve a SLURM job's training arguments before any rank starts (used by slurm/run.sh).

    python slurm/plan.py JOB_TAG [train.py flags...]

Validates the flags and any --config YAML/JSON with the project's own parser (a bad value fails here,
in the batch script, in a second, instead of on every rank after the job waited in the queue), and
prints three lines for the batch script:

    <absolute output_dir>
    given | default      (default: neither the flags nor the config set output_dir; run.sh then
                          passes --output_dir outputs/<JOB_TAG>, stable across requeues)
    <MLflow tracking URI the run will log to>

Exit code 2 and one line on stderr on bad input, as train.py does.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infoprompt_ds.config import ConfigError
from infoprompt_ds.config_load import build_parser, load_config_file, parse_config  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: plan.py JOB_TAG [train.py flags...]", file=sys.stderr)
        return 2
    job_tag, flags = argv[0], argv[1:]
    try:
        cfg = parse_config(flags)
        known, _ = build_parser().parse_known_args(flags)
        given = "output_dir" in vars(known) or (
            bool(getattr(known, "config", None)) and "output_dir" in load_config_file(known.config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir) if given else Path("outputs") / job_tag
    out = out.resolve()
    try:
        from infoprompt_ds.tracking.store import default_tracking_uri

        uri = default_tracking_uri(str(out))[0]
    except Exception:  # the URI is only shown to the user; never fail a job over it
        uri = "(see infoprompt_ds/tracking/store.py)"
    print(out)
    print("given" if given else "default")
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
