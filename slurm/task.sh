#!/bin/bash
# One rank of the training step that slurm/run.sh starts with `srun` (one SLURM task = one rank = one GPU).
#
#   srun bash slurm/task.sh python train.py [flags...]
#
# Maps SLURM's task layout onto the variables torch.distributed / DeepSpeed read (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE; MASTER_ADDR/MASTER_PORT come from run.sh), runs the command as a child,
# passes SIGUSR1/SIGTERM on to it, and writes its exit code to $INFOPROMPT_RC_DIR/rank<RANK>.rc.
#
# A rank that stopped on a signal after saving its checkpoint exits 75 (EXIT_PREEMPTED). This wrapper
# reports that to srun as success (0) and keeps the 75 in the .rc file: srun runs with
# --kill-on-bad-exit, so a real crash on one rank ends the whole step at once (instead of leaving the
# others blocked in a collective until the timeout), while a graceful stop never kills a rank that is
# still closing its MLflow run.
set -u
: "${SLURM_PROCID:?task.sh runs under srun (SLURM_PROCID is not set)}"

# Tasks on this node, from the compressed list SLURM gives ("2(x3),1" = 2,2,2,1 tasks on nodes 0..3).
tasks_on_node() {
  local idx=$2 part n r
  IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then n=${BASH_REMATCH[1]}; r=${BASH_REMATCH[2]}; else n=$part; r=1; fi
    if (( idx < r )); then echo "$n"; return; fi
    idx=$(( idx - r ))
  done
  echo 1
}

export RANK=$SLURM_PROCID
export WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}
export LOCAL_RANK=$SLURM_LOCALID
export LOCAL_WORLD_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" "${SLURM_NODEID:-0}")
# With per-task GPU binding (--gpus-per-task=1 / --gpu-bind) each rank sees exactly one GPU: device 0.
if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* && $LOCAL_WORLD_SIZE -gt 1 ]]; then
  export LOCAL_RANK=0
fi
# Threads per rank: what SLURM gave this task, not the whole machine (oversubscribed ranks run 2-3x slower).
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  t=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-1} / LOCAL_WORLD_SIZE ))}
  export OMP_NUM_THREADS=$(( t > 0 ? t : 1 ))
fi
export PYTHONUNBUFFERED=1

echo "[task.sh] rank $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE on $(hostname) pid $$" \
     "master $MASTER_ADDR:$MASTER_PORT threads $OMP_NUM_THREADS restart ${SLURM_RESTART_COUNT:-0}"

child= got=
forward() { got=1; [[ -n $child ]] && kill -s "$1" "$child" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
"$@" &
child=$!
rc=
while :; do   # `wait` also returns (>128) when a trapped signal arrives: then wait again
  got=; wait "$child"; r=$?
  [[ $r == 127 && -n $rc ]] && break   # the child had already been reaped: rc holds its status
  rc=$r
  [[ -n $got && $r -gt 128 ]] || break
done
if [[ -n ${INFOPROMPT_RC_DIR:-} ]]; then
  echo "$rc" > "$INFOPROMPT_RC_DIR/.rank$RANK.rc.tmp" && mv "$INFOPROMPT_RC_DIR/.rank$RANK.rc.tmp" "$INFOPROMPT_RC_DIR/rank$RANK.rc"
fi
echo "[task.sh] rank $RANK exit code $rc"
(( rc == 75 )) && exit 0
exit "$rc"
