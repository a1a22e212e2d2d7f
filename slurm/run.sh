#!/bin/bash
# Multi-node ZeRO-3 InfoPrompt training under SLURM, preemption-safe. Submit from the repository root:
#
#   sbatch slurm/run.sh [train.py flags...]                                   # 1 node, 1 rank (CPU)
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/run.sh --config my.yaml
#   sbatch --nodes=2 -p gpu --time=04:00:00 --signal=B:USR1@300 slurm/run.sh --seed 3
#
# Layout: one SLURM task per rank (= per GPU; 1 per node on CPU nodes), started by one `srun`; each
# task runs slurm/task.sh, which maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/
# WORLD_SIZE. Why not srun + torchrun per node: SLURM then signals every rank itself (torchrun's agent
# dies on SIGUSR1 and SIGKILLs its workers 30 s after SIGTERM, mid-checkpoint), sees every rank's exit
# code, and writes per-rank logs; torchrun's own restarts would also fight SLURM's requeue. See docs/slurm.md.
#
# Preemption / time limit: SLURM sends SIGUSR1 to this script (--signal=B:USR1@180: 180 s before the time
# limit); it passes the signal to every rank, each finishes its step, all save a checkpoint together and
# exit 75; this script then requeues the job (`scontrol requeue`). A requeued run (SLURM_RESTART_COUNT > 0)
# resumes from output_dir's latest checkpoint and continues the same MLflow run. Preemption by the
# scheduler (PreemptMode=REQUEUE) or `scontrol requeue` send SIGTERM to every rank instead: they save the
# same way within KillWait and SLURM requeues the job itself. A real error (any other exit code) is never
# requeued, and at most MAX_RESTARTS requeues happen in all.
#
# Environment knobs (sbatch exports the submitting shell's environment):
#   MLFLOW_TRACKING_URI  where the run logs (must be reachable from the compute nodes); default: a sqlite
#                        file inside output_dir (infoprompt_ds/tracking/store.py: default_store)
#   MAX_RESTARTS=10      requeues allowed before the job is left failed
#   RESUME=requeue       requeue: resume only in a requeued job; auto: also on a fresh submission when
#                        output_dir holds a checkpoint; never
#   NET_IFNAME           network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME)
#   PYTHON=python3       interpreter (activate your venv before sbatch, or point PYTHON at it)
#   LOG_ROOT=slurm/logs  logs go to $LOG_ROOT/<job name>-<job id>/attempt<restart>/<node>-rank<rank>.log
#   SRUN_ARGS            extra flags for the training srun (e.g. "--cpu-bind=cores")
#   INFOPROMPT_REPO      the repository, when you submit from another folder (default: the submit dir)
#
#SBATCH --job-name=infoprompt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail
EXIT_PREEMPTED=75
log() { echo "[run.sh $(date '+%F %T')] $*"; }
die() { log "error: $*" >&2; exit "${2:-1}"; }

REPO=${INFOPROMPT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f $REPO/train.py && -f $REPO/slurm/task.sh ]] \
  || die "$REPO is not the infoprompt-ds repository: submit from its root or set INFOPROMPT_REPO" 2
cd "$REPO" || exit 2
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: use 'sbatch slurm/run.sh ...', or salloc first" 2

# --- signals: record them at once; act when the training step has ended --------------------------------
GOT= INTR= SRUN_PID=
on_signal() {
  GOT=$1 INTR=1
  log "received SIG$1"
  # USR1 comes from SLURM (--signal=B:USR1@...) to this script only: hand it to every rank. TERM (scancel,
  # scontrol requeue, preemption, time limit) reaches every rank from SLURM directly.
  [[ $1 == USR1 && -n $SRUN_PID ]] && kill -s USR1 "$SRUN_PID" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# --- the job ---------------------------------------------------------------------------------------------
JOB_TAG=${SLURM_JOB_ID}
[[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && JOB_TAG=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
JOB_NAME=${SLURM_JOB_NAME:-infoprompt}
RESTART=${SLURM_RESTART_COUNT:-0}
MAX_RESTARTS=${MAX_RESTARTS:-10}
RESUME=${RESUME:-requeue}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
BATCH=0; [[ ${ENVIRONMENT:-} == BATCH ]] && BATCH=1   # sbatch sets ENVIRONMENT=BATCH; salloc does not
LOG_DIR=${LOG_ROOT:-$REPO/slurm/logs}/$JOB_NAME-$JOB_TAG
if (( BATCH )); then ATTEMPT_DIR=$LOG_DIR/attempt$RESTART; else ATTEMPT_DIR=$LOG_DIR/interactive-$(date +%Y%m%d-%H%M%S); fi
mkdir -p "$ATTEMPT_DIR" || die "cannot create $ATTEMPT_DIR"
rm -f "$ATTEMPT_DIR"/rank*.rc

log "job $JOB_TAG ($JOB_NAME) restart $RESTART/$MAX_RESTARTS on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} rank(s); batch host $(hostname); logs in $ATTEMPT_DIR"
(( RESTART <= MAX_RESTARTS )) \
  || die "requeued $RESTART times (MAX_RESTARTS=$MAX_RESTARTS): giving up; resubmit with RESUME=auto to continue"

# Validate the flags/config once, here, and find output_dir (default outputs/<job>: stable across requeues).
mapfile -t PLAN < <("$PYTHON" "$REPO/slurm/plan.py" "$JOB_NAME-$JOB_TAG" "$@"; echo "rc=$?")
[[ ${PLAN[-1]} == rc=0 && ${#PLAN[@]} -eq 4 ]] || die "bad arguments (see the line above); not starting" 2
OUTPUT_DIR=${PLAN[0]}
ARGS=("$@")
[[ ${PLAN[1]} == default ]] && ARGS+=(--output_dir "$OUTPUT_DIR")
log "output_dir $OUTPUT_DIR; MLflow tracking URI ${PLAN[2]}"

latest_step() {  # name of the newest complete checkpoint (empty: none)
  local tag; tag=$(cat "$OUTPUT_DIR/checkpoints/latest" 2>/dev/null) || return 0
  [[ -f $OUTPUT_DIR/checkpoints/$tag/infoprompt_complete.json ]] && echo "$tag"
}
CKPT_BEFORE=$(latest_step)
if (( RESTART > 0 )) && [[ -f $OUTPUT_DIR/metrics.json ]]; then  # train.py writes it last, when finished
  log "restart $RESTART: $OUTPUT_DIR/metrics.json is already there (the run finished): nothing to do"
  exit 0
fi
if [[ -n $CKPT_BEFORE ]] && { [[ $RESUME == requeue ]] && (( RESTART > 0 )) || [[ $RESUME == auto ]]; }; then
  ARGS+=(--resume_from_checkpoint latest)
  log "resuming from $OUTPUT_DIR/checkpoints/$CKPT_BEFORE (and its MLflow run)"
elif (( RESTART > 0 )); then
  log "restart $RESTART but no complete checkpoint in $OUTPUT_DIR/checkpoints: starting from step 0"
fi

# MLflow tags, for finding the job's run (used when the tracker supports INFOPROMPT_MLFLOW_TAGS).
export INFOPROMPT_MLFLOW_TAGS=$("$PYTHON" - "$JOB_TAG" "$JOB_NAME" <<'PY'
import json, os, sys
try:
    tags = json.loads(os.environ.get("INFOPROMPT_MLFLOW_TAGS") or "{}")
    tags = tags if isinstance(tags, dict) else {}
except ValueError:
    tags = {}
tags.update({"slurm_job_id": sys.argv[1], "slurm_job_name": sys.argv[2],
             "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME", "")})
print(json.dumps(tags))
PY
)

# --- rendezvous: rank 0 runs on the first node of the allocation ------------------------------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[[ -n $MASTER_ADDR ]] || die "could not read the node list ($SLURM_JOB_NODELIST)"
# A port derived from the job id (jobs sharing a node do not collide), moved up if it is taken here.
MASTER_PORT=$(( 20000 + ${SLURM_JOB_ID} % 20000 ))
if [[ $(hostname -s) == "$MASTER_ADDR" ]]; then  # the batch script runs on the first node: probe
  MASTER_PORT=$("$PYTHON" - "$MASTER_PORT" <<'PY'
import socket, sys
base = int(sys.argv[1])
for port in list(range(base, base + 200)) + [0]:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
PY
)
fi
export MASTER_ADDR MASTER_PORT
if [[ -n ${NET_IFNAME:-} ]]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NET_IFNAME}
fi
if [[ -n ${SLURM_GPUS_ON_NODE:-}${SLURM_JOB_GPUS:-}${SLURM_GPUS_PER_NODE:-} ]]; then BACKEND=nccl; else BACKEND=gloo; fi
log "rendezvous $MASTER_ADDR:$MASTER_PORT, world size ${SLURM_NTASKS:-1}, backend $BACKEND (train.py picks nccl when CUDA is visible)"

# --- train -------------------------------------------------------------------------------------------------
if [[ -n $GOT ]]; then
  log "signalled before training started"
  ranks_rc=$EXIT_PREEMPTED
else
  export INFOPROMPT_RC_DIR=$ATTEMPT_DIR PYTHONUNBUFFERED=1
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 --output="$ATTEMPT_DIR/%N-rank%t.log" \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} ${SRUN_ARGS:-} \
    bash "$REPO/slurm/task.sh" "$PYTHON" "$REPO/train.py" "${ARGS[@]}" &
  SRUN_PID=$!
  src=
  while :; do  # a trapped signal interrupts `wait` (> 128): wait again until srun itself has ended
    INTR=; wait "$SRUN_PID"; r=$?
    [[ $r == 127 && -n $src ]] && break  # srun had already been reaped: src holds its status
    src=$r
    [[ -n $INTR && $r -gt 128 ]] || break
  done
  SRUN_PID=
  # Each rank's own exit code (srun only reports the worst): 0 done, 75 stopped after a checkpoint.
  # Worst first: a rank's own error code (the root cause), then a rank killed by a signal (srun's
  # --kill-on-bad-exit ends the others with SIGTERM), then "missing" (killed outright), then 75, then 0.
  err= killed= missing= stopped=
  for ((r = 0; r < ${SLURM_NTASKS:-1}; r++)); do
    c=$(cat "$ATTEMPT_DIR/rank$r.rc" 2>/dev/null) || c=missing
    (( r < 8 )) && log "rank $r exit code $c"
    case $c in
      0) ;;
      75) stopped=75 ;;
      missing) missing=missing ;;
      *) if (( c > 128 || c < 0 )); then killed=${killed:-$c}; else err=${err:-$c}; fi ;;  # < 0: python killed by a signal
    esac
  done
  ranks_rc=${err:-${killed:-${missing:-${stopped:-0}}}}
  log "srun exit code $src"
  # A rank killed by the signal itself (it came before train.py installed its handler) stopped cleanly too.
  if [[ $ranks_rc != 0 && $ranks_rc != 75 && -n $GOT ]] && [[ $ranks_rc == missing || $ranks_rc -gt 128 ]]; then
    log "ranks ended by SIG$GOT before they could checkpoint: treating as preempted"
    ranks_rc=75
  fi
fi

if [[ $ranks_rc == 0 ]]; then
  log "training finished: $OUTPUT_DIR/metrics.json"
  exit 0
fi
if [[ $ranks_rc != 75 ]]; then
  log "training failed (rank exit code $ranks_rc): not requeued; see $ATTEMPT_DIR"
  [[ $ranks_rc =~ ^[0-9]+$ ]] && exit "$ranks_rc"
  exit 1
fi
CKPT_AFTER=$(latest_step)
log "stopped at checkpoint ${CKPT_AFTER:-none} (signal ${GOT:-none})"
if [[ $GOT == TERM ]]; then
  # scancel / scontrol requeue / preemption: SLURM decides whether the job comes back; do not requeue here.
  log "terminated by SLURM: if it requeues the job, the next start resumes from ${CKPT_AFTER:-step 0}"
  exit $EXIT_PREEMPTED
fi
if (( ! BATCH )); then
  log "interactive run stopped: run the same command with RESUME=auto to continue"
  exit $EXIT_PREEMPTED
fi
if (( RESTART >= MAX_RESTARTS )); then
  log "not requeuing: already requeued $RESTART times (MAX_RESTARTS=$MAX_RESTARTS); resubmit with RESUME=auto"
  exit $EXIT_PREEMPTED
fi
if [[ -n $CKPT_BEFORE && $CKPT_AFTER == "$CKPT_BEFORE" ]]; then
  log "not requeuing: this attempt made no progress (still at $CKPT_AFTER); is the time limit shorter than startup?"
  exit $EXIT_PREEMPTED
fi
log "requeuing job $SLURM_JOB_ID (restart $((RESTART + 1))): it resumes from ${CKPT_AFTER:-step 0}"
scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed; resubmit with RESUME=auto to continue" $EXIT_PREEMPTED
exit $EXIT_PREEMPTED
