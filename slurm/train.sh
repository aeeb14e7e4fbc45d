#!/usr/bin/env bash
# Train alexdist under Slurm, preemption-safe.
#
#   sbatch slurm/train.sh RECIPE [key=value ...]
#   sbatch --nodes=2 --gpus-per-node=8 slurm/train.sh recipes/bn.yaml precision=bf16
#
# One srun task per node; each runs `alexdist launch` (`accelerate launch -m alexdist.train` with one-line errors
# and alexdist's exit codes; $ALEXDIST_BIN names another alexdist command) for that node's processes (one per GPU,
# or $ALEXDIST_PROCS_PER_NODE CPU processes, default 2, when the allocation has no GPUs). The run directory is keyed
# by the job id (runs/slurm-<jobid> unless output_dir=... is given), so a requeued job resumes from its own
# checkpoints and continues its W&B run.
#
# Preemption / time limit: Slurm sends USR1 to this batch shell (--signal=B:USR1@LEAD) LEAD seconds before the
# end. The shell writes output_dir/STOP (launchers don't forward USR1 to their workers); the ranks agree to stop
# at the next optimizer step, checkpoint, and exit 75; the shell then requeues the job, which resumes.
# A plain `scancel` sends SIGTERM to every process: the ranks checkpoint within KillWait and exit.
#SBATCH --job-name=alexdist
#SBATCH --ntasks-per-node=1
# CPUs for all of a node's processes: one launcher task per node starts them. Size it as processes per node x
# CPU threads each (data lives on the device, so 2-4 per GPU process is plenty: 8 GPUs -> --cpus-per-task=32);
# the processes' OMP threads are set from it. Memory per node likewise (--mem): ~3 GB per process for CIFAR.
#SBATCH --cpus-per-task=2
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] slurm/train.sh RECIPE [key=value ...]" >&2
  exit 2
fi
RECIPE=$1
shift
OVERRIDES=("$@")

# The run directory: the user's output_dir=... if given, else one per job id (stable across requeues).
OUTPUT_DIR=""
for o in "${OVERRIDES[@]}"; do
  case "$o" in output_dir=*) OUTPUT_DIR=${o#output_dir=} ;; esac
done
if [ -z "$OUTPUT_DIR" ]; then
  OUTPUT_DIR=runs/slurm-${SLURM_JOB_ID:?not running under Slurm}
  OVERRIDES+=("output_dir=$OUTPUT_DIR")
fi
mkdir -p "$OUTPUT_DIR"

# Processes per node: GPUs of the allocation, else CPU processes.
GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
GPUS=${GPUS##*:}  # "a100:4" -> "4"
if [ "${GPUS:-0}" -gt 0 ] 2>/dev/null; then
  PROCS_PER_NODE=$GPUS
else
  PROCS_PER_NODE=${ALEXDIST_PROCS_PER_NODE:-2}
fi
# The task's CPUs shared by its processes (at least one thread each). srun must be told: since Slurm 22.05 it
# no longer inherits --cpus-per-task from sbatch.
CPUS=${SLURM_CPUS_PER_TASK:-$PROCS_PER_NODE}
THREADS=$((CPUS / PROCS_PER_NODE))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}
NNODES=${SLURM_NNODES:-1}
NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((20000 + SLURM_JOB_ID % 20000))
ALEXDIST=${ALEXDIST_BIN:-alexdist}
MULTI=(--multi_gpu)
[ "$NUM_PROCESSES" -gt 1 ] || MULTI=()

# NCCL (GPU jobs; gloo on CPUs ignores these). Each is only a default: a value set before sbatch wins.
# - NCCL_DEBUG=WARN: NCCL's own errors and warnings in the job's log, not its per-call INFO (set INFO to see which
#   network and transport it picked, e.g. whether InfiniBand is used).
# - TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a collective that fails or passes distributed.step_timeout_s aborts the
#   process (torchrun's own default, set here too for a launcher that does not set it); a dead peer otherwise
#   blocks its partners until the timeout, and with 0 forever. (NCCL_ASYNC_ERROR_HANDLING is its old name.)
# - NCCL_SOCKET_IFNAME and NCCL_IB_HCA: left unset, NCCL picks the interface and the InfiniBand adapters itself;
#   on nodes with several networks set them to the fast one (e.g. NCCL_SOCKET_IFNAME=ib0, or ^docker0,lo to
#   exclude), as the cluster's documentation says. NCCL_IB_DISABLE=1 forces TCP when InfiniBand misbehaves.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

echo "alexdist/slurm: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} | $NNODES node(s) x $PROCS_PER_NODE process(es) | $CPUS CPUs per node, $OMP_NUM_THREADS thread(s) per process | head $HEAD:$PORT | output $OUTPUT_DIR"

STARTED=$(date +%s)
STOPPING=0
on_usr1() {
  echo "alexdist/slurm: USR1 (preemption or time limit): asking the training to checkpoint and stop"
  STOPPING=1
  touch "$OUTPUT_DIR/STOP"
}
trap on_usr1 USR1

# \$SLURM_NODEID is escaped so that each node's task expands its own rank.
# The training's own exit code comes back through srun: 75 when the ranks stopped on request.
srun --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=1 bash -c "exec $ALEXDIST launch ${MULTI[*]} \
  --num_machines $NNODES --machine_rank \$SLURM_NODEID --main_process_ip $HEAD --main_process_port $PORT \
  --num_processes $NUM_PROCESSES --mixed_precision no --dynamo_backend no \
  $(printf '%q ' "$RECIPE" "${OVERRIDES[@]}")" &
SRUN=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun has really exited.
while :; do
  wait "$SRUN"
  RC=$?
  kill -0 "$SRUN" 2>/dev/null || break
done

STATUS=""  # this attempt's run status, from the summary.json it wrote (an older one does not count)
if [ -f "$OUTPUT_DIR/summary.json" ] && [ "$(stat -c %Y "$OUTPUT_DIR/summary.json")" -ge "$STARTED" ]; then
  STATUS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status",""))' \
    "$OUTPUT_DIR/summary.json" 2>/dev/null || true)
fi
echo "alexdist/slurm: training exited $RC, run status '${STATUS:-none}'"
if [ "$STOPPING" = 1 ] && [ "$STATUS" = stopped ]; then
  echo "alexdist/slurm: checkpoint saved; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || true  # under preemption Slurm may be requeueing it already
  exit 0
fi
[ "$STATUS" = stopped ] && exit 75  # stopped by SIGTERM (e.g. scancel): resumable, not requeued
exit "$RC"
