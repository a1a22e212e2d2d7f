#!/bin/bash
# A sweep as a SLURM job array: each array task is one complete, preemption-safe run of slurm/run.sh.
#
#   sbatch slurm/sweep.sh --config my.yaml                    # default grid: 2 methods x 3 seeds = 6 tasks, 2 at a time
#   SWEEP="method=infoprompt,prompt seed=1,2,3,4" sbatch --array=0-7%4 slurm/sweep.sh --config my.yaml
#   bash slurm/sweep.sh --plan                                # print the grid and the matching --array
#
# SWEEP is a space-separated list of field=v1,v2,... (any train.py field); the grid is their product,
# in order, the last field varying fastest. Array task i runs grid point i with
#   --<field> <value> ... --output_dir $SWEEP_DIR/<field>-<value>_..., SWEEP_DIR defaulting to
#   outputs/<job name>-<array job id>,
# after your own flags (so the grid wins). `--array=0-<N-1>%K` runs at most K tasks at once; a task whose
# index is past the grid fails at once. Every task inherits run.sh's requeue/resume behaviour (its own
# SLURM_RESTART_COUNT, its own checkpoints), and its MLflow run is tagged slurm_job_id=<array id>_<index>.
# Node/GPU shape per task as for run.sh: sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 ...
#
#SBATCH --job-name=infoprompt-sweep
#SBATCH --array=0-5%2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out

set -uo pipefail
SWEEP=${SWEEP:-"method=infoprompt,prompt seed=13,42,87"}

read -ra AXES <<<"$SWEEP"
N=1
for axis in "${AXES[@]}"; do
  [[ $axis =~ ^[A-Za-z_][A-Za-z0-9_]*=[^=]+$ ]] || { echo "sweep.sh: bad SWEEP entry '$axis' (want field=v1,v2,...)" >&2; exit 2; }
  IFS=, read -ra vals <<<"${axis#*=}"
  N=$(( N * ${#vals[@]} ))
done

point() {  # grid point $1 as "--field value" pairs (one per line) and its folder name
  local i=$1 k axis field vals name=
  local -a flags=()
  for ((k = ${#AXES[@]} - 1; k >= 0; k--)); do
    axis=${AXES[k]}; field=${axis%%=*}
    IFS=, read -ra vals <<<"${axis#*=}"
    flags=(--"$field" "${vals[i % ${#vals[@]}]}" "${flags[@]}")
    name="$field-${vals[i % ${#vals[@]}]}${name:+_$name}"
    i=$(( i / ${#vals[@]} ))
  done
  POINT_FLAGS=("${flags[@]}"); POINT_NAME=$name
}

if [[ ${1:-} == --plan || -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
  echo "grid ($N runs) from SWEEP=\"$SWEEP\":"
  for ((i = 0; i < N; i++)); do point "$i"; echo "  $i: ${POINT_FLAGS[*]}"; done
  echo "submit: sbatch --array=0-$((N - 1))%2 slurm/sweep.sh [train.py flags...]"
  [[ ${1:-} == --plan ]] && exit 0
  echo "sweep.sh: not an array task (SLURM_ARRAY_TASK_ID unset): submit it with sbatch" >&2
  exit 2
fi

(( SLURM_ARRAY_TASK_ID < N )) || { echo "sweep.sh: array index $SLURM_ARRAY_TASK_ID is past the grid ($N runs): use --array=0-$((N - 1))" >&2; exit 2; }
point "$SLURM_ARRAY_TASK_ID"
REPO=${INFOPROMPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
SWEEP_DIR=${SWEEP_DIR:-outputs/${SLURM_JOB_NAME:-infoprompt-sweep}-${SLURM_ARRAY_JOB_ID}}
echo "[sweep.sh] array task $SLURM_ARRAY_TASK_ID/$N: ${POINT_FLAGS[*]}"
# exec: run.sh becomes this process, so SLURM's USR1 (B: = the batch shell) reaches its trap.
exec bash "$REPO/slurm/run.sh" "$@" "${POINT_FLAGS[@]}" --output_dir "$SWEEP_DIR/$POINT_NAME"
