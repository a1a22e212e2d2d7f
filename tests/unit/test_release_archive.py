"""Issue 36 item 5: the benchmark scripts run from a release archive (no .git): the commit is "unknown"."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from pathlib import Path
import common, ablation_table
git = common.git_info()
doc = Path("study.json")
doc.write_text(json.dumps({"meta": {"git": git}, "runs": []}))
print(json.dumps({"git": git, "table": ablation_table.arms_table([doc])}))
"""


def test_benchmarks_record_unknown_commit_outside_git(tmp_path):
    bench = tmp_path / "archive" / "benchmarks"
    bench.mkdir(parents=True)
    for name in ("common.py", "study.py", "ablation_table.py"):
        shutil.copy(ROOT / "benchmarks" / name, bench / name)
    # git must not find a repository above the copy either
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=bench, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["git"] == {"commit": "unknown", "dirty": False}
    assert doc["table"][0] == "from study.json (trained at unknown)"
