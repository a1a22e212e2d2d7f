#!/bin/bash
# CI stage "slurm": the SLURM integration tests (tests/slurm/test_slurm.py, marker `slurm`) on a real two-node
# cluster: tests/slurm/cluster.sh brings up nodes n1 and n2 (network namespaces on this machine; it
# installs munge and SLURM from Debian when missing), the tests submit real jobs to them, and the
# cluster is brought down again whatever happens.
#
#   .ci/slurm.sh [extra pytest args]        # as root, after the project's `pip install -e .[test]`
#
# INFOPROMPT_REQUIRE_SLURM=1 turns "cluster unavailable" from a skip into a failure: in CI a skipped
# SLURM stage would pass silently. SLURM_CLUSTER_SH overrides the cluster script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CLUSTER=$(realpath "${SLURM_CLUSTER_SH:-tests/slurm/cluster.sh}")
[[ -f $CLUSTER ]] || { echo ".ci/slurm.sh: no cluster script at $CLUSTER" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo ".ci/slurm.sh: needs root (the cluster lives in network namespaces)" >&2; exit 1; }

down() { echo "--- slurm cluster down"; bash "$CLUSTER" down || true; }
trap down EXIT
echo "--- slurm cluster up ($CLUSTER)"
bash "$CLUSTER" up

echo "--- pytest -m slurm"
export INFOPROMPT_REQUIRE_SLURM=1 SLURM_CLUSTER_SH=$CLUSTER
"${PYTHON:-python3}" -m pytest -m slurm tests/slurm/test_slurm.py -v -rs --durations=10 "$@"
