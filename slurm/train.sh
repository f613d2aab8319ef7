#!/bin/bash
# dtrain on SLURM: one torchrun per node, c10d rendezvous, checkpoint + requeue on preemption.
#
#   sbatch slurm/train.sh CONFIG [key=value ...]
#   sbatch --nodes=4 --gres=gpu:8 slurm/train.sh examples/cluster/llama3_8b_lora.yaml optim.lr=1e-4
#
# The options below are defaults: edit them, or override any of them on the sbatch command line.
#SBATCH --job-name=dtrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts one worker per GPU
#SBATCH --cpus-per-task=16
##SBATCH --gres=gpu:8                # uncomment on GPU nodes (or pass --gres / --gpus-per-node)
##SBATCH --partition=gpu
#SBATCH --time=24:00:00
# USR1 to this script 5 minutes before the time limit: it is passed on to every training process,
# which agree on a step, save a checkpoint and exit 75; the script then requeues the job.
# (Slurm may send it up to ~1 minute early or late: leave room for one step plus one save.)
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued run appends to the same logs
#SBATCH --output=%x-%j.out           # the script's own messages (Slurm cannot create a directory for it)
#
# Environment knobs:
#   DTRAIN_NPROC_PER_NODE  workers per node (default: the GPUs Slurm allocated on the node, else 1)
#   DTRAIN_LOG_DIR         where the per-job log directory goes (default: logs)
#   DTRAIN_PYTHON          the interpreter that has dtrain installed (default: python)
#   DTRAIN_MAX_RESTARTS    stop requeueing after this many restarts (default: 50)
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/train.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ ! -f "$CONFIG" ]; then
    echo "error: config file $CONFIG not found (relative paths start at $PWD, the submission directory)" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: run this script through sbatch (sbatch slurm/train.sh $CONFIG ...)" >&2
    exit 2
fi

PYTHON=${DTRAIN_PYTHON:-python}
RESTART=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NPROC_PER_NODE=${DTRAIN_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
LOG_DIR=${DTRAIN_LOG_DIR:-logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$LOG_DIR"

# The rendezvous host is the first node, where this script runs; its address comes from Slurm
# (NodeAddr), since node names need not resolve. A port free here now, new on every restart.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}  # the node's CPUs shared by its workers
export PYTHONUNBUFFERED=1

echo "$(date -Is) job $SLURM_JOB_ID restart $RESTART: $NNODES node(s) x $NPROC_PER_NODE worker(s), rendezvous" \
     "$HEAD_ADDR:$PORT, logs in $LOG_DIR/"

# Signals. USR1 (the time-limit warning above, or `scancel --batch --signal=USR1`) is passed on
# to srun, which delivers it to every process of the step: the dtrain launcher on each node and
# its workers, who save a checkpoint at the next step boundary and exit 75.
# TERM means Slurm is ending the job itself (scancel, time limit, `scontrol requeue`, preemption):
# it signals the step's processes directly, dtrain saves the same way within KillWait, and Slurm,
# not this script, decides whether the job comes back. TERM is not passed on to srun: the step
# has it already, and srun answers a TERM with "forcing job termination" (a SIGKILL request for
# its tasks), which must not race the save.
ENDING=0
SRUN_PID=
trap 'echo "$(date -Is) USR1: asking dtrain to checkpoint and stop"; kill -USR1 "$SRUN_PID" 2>/dev/null' USR1
trap 'ENDING=1; echo "$(date -Is) TERM: Slurm is ending the job"' TERM

# srun in the background so that the traps run while it works (bash defers them until a
# foreground command ends). No --kill-on-bad-exit: a node that finishes first must not kill
# one still writing its part of the checkpoint.
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
     --open-mode=append --output="$LOG_DIR/node%t-%N.out" \
     "$PYTHON" -m dtrain train "$CONFIG" "$@" --resume auto \
     --nproc "$NPROC_PER_NODE" --nnodes "$NNODES" \
     --rdzv-endpoint "$HEAD_ADDR:$PORT" --rdzv-id "$SLURM_JOB_ID" &
SRUN_PID=$!
# A trap interrupts `wait`; wait again until srun has really exited (bash keeps its status).
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
done
wait "$SRUN_PID"
RC=$?

PREEMPTED=75  # dtrain's exit code: a checkpoint of the current step is saved, run me again
if [ "$RC" -eq "$PREEMPTED" ] && [ "$ENDING" -eq 0 ]; then
    if [ "$RESTART" -ge "${DTRAIN_MAX_RESTARTS:-50}" ]; then
        echo "$(date -Is) checkpoint saved; not requeueing after $RESTART restarts (DTRAIN_MAX_RESTARTS)" >&2
        exit "$RC"
    fi
    echo "$(date -Is) checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from output_dir)"
    ENDING=1
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "$(date -Is) scontrol requeue failed; resubmit to resume: sbatch slurm/train.sh $CONFIG $*" >&2
elif [ "$RC" -eq "$PREEMPTED" ]; then
    echo "$(date -Is) checkpoint saved; the job was ended by Slurm (it comes back only if Slurm requeued it)"
else
    echo "$(date -Is) dtrain exited with $RC"
fi
exit "$RC"
