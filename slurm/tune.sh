#!/bin/bash
# A Ray Tune search inside a SLURM allocation: a Ray head on the first node, a Ray worker on
# every other node (each in its own srun step), and the Tune driver on the first node. Trials of
# tune.resources.workers workers (ddp / fsdp through Ray Train) are placed by Ray, across nodes.
#
#   sbatch slurm/tune.sh CONFIG [key=value ...]
#   sbatch --nodes=4 --gres=gpu:8 slurm/tune.sh examples/tiny_tune.yaml
#
# The options below are defaults: edit them, or override any of them on the sbatch command line.
#SBATCH --job-name=dtrain-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one Ray node per SLURM node
#SBATCH --cpus-per-task=16
##SBATCH --gres=gpu:8
##SBATCH --partition=gpu
#SBATCH --time=24:00:00
# USR1 to this script 5 minutes before the time limit: every running trial saves a checkpoint at
# its next step, the search saves its state and stops, and the script requeues the job, which
# continues the search: finished trials are not run again, stopped ones continue from their save.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued run appends to the same log
#SBATCH --output=%x-%j.out
#
# Environment knobs:
#   DTRAIN_PYTHON          the interpreter that has dtrain installed (default: python)
#   DTRAIN_RAY             the ray command (default: ray)
#   DTRAIN_RAY_START_ARGS  more `ray start` arguments for every node (e.g. --object-store-memory=...)
#   DTRAIN_LOG_DIR         where the per-job directory (and the stop file) goes (default: logs);
#                          on storage every node sees, like tune.storage_dir
#   DTRAIN_MAX_RESTARTS    stop requeueing after this many restarts (default: 50)
#   RAY_AUTH_MODE          reaches ray start and the driver alike (both inherit this environment)
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/tune.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ ! -f "$CONFIG" ]; then
    echo "error: config file $CONFIG not found (relative paths start at $PWD, the submission directory)" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: run this script through sbatch (sbatch slurm/tune.sh $CONFIG ...)" >&2
    exit 2
fi

PYTHON=${DTRAIN_PYTHON:-python}
RAY=${DTRAIN_RAY:-ray}
read -r -a RAY_ARGS <<< "${DTRAIN_RAY_START_ARGS:-}"
RESTART=${SLURM_RESTART_COUNT:-0}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
CPUS=${SLURM_CPUS_PER_TASK:-1}
GPUS=${SLURM_GPUS_ON_NODE:-0}
LOG_DIR=${DTRAIN_LOG_DIR:-logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
mkdir -p "$LOG_DIR"
# The search's stop request (checkpoint.stop_file): the trials look for it on every node, at
# every step. Absolute, since Ray starts trials in directories of its own.
STOP_FILE=$(cd "$LOG_DIR" && pwd)/stop
rm -f "$STOP_FILE"  # (a requeued run's request is done with)

# The head is the first node, where this script runs; its address comes from SLURM (NodeAddr),
# since node names need not resolve.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
ADDRESS=$HEAD_ADDR:$PORT
# Every Ray process of this job (started by the ray start below) and the driver find this cluster,
# not another job's on the same node: Ray's own helpers look for "the" cluster on their node.
export RAY_ADDRESS=$ADDRESS
echo "$(date -Is) job $SLURM_JOB_ID restart $RESTART: Ray head on $HEAD_NODE ($ADDRESS), $NNODES node(s) x" \
     "$CPUS CPU(s), $GPUS GPU(s); logs in $LOG_DIR/"

# `ray start --block` stays in the foreground, so each Ray node lives exactly as long as its srun
# step: stopping the srun (by pid, below) makes SLURM end every Ray process of that step, on
# this job's nodes only (`ray stop` would kill every Ray process on a node, other jobs' too).
RAY_PIDS=()
stop_ray() {
    for pid in "${RAY_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${RAY_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    RAY_PIDS=()
}
trap 'stop_ray' EXIT

# Signals. USR1 (the time-limit warning above, or `scancel --batch --signal=USR1`): create the
# stop file; the search saves and exits 75, and the job is requeued below. (Not passed on to the
# driver: Tune takes USR1 as Ctrl-C and would end the trials before they save.)
# TERM means SLURM is ending the job itself (scancel, time limit, `scontrol requeue`): every
# process of the job has it, Ray's included, which exit at once; SLURM, not this script, decides
# whether the job comes back, and the search then continues from each trial's last checkpoint.
ENDING=0
trap 'echo "$(date -Is) USR1: asking the trials to checkpoint and the search to stop"; touch "$STOP_FILE"' USR1
trap 'ENDING=1; echo "$(date -Is) TERM: Slurm is ending the job"' TERM

srun --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --cpus-per-task="$CPUS" \
     --open-mode=append --output="$LOG_DIR/ray-head.out" \
     "$RAY" start --head --block --node-ip-address="$HEAD_ADDR" --port="$PORT" \
     --num-cpus="$CPUS" --num-gpus="$GPUS" --temp-dir="/tmp/ray-$SLURM_JOB_ID" --disable-usage-stats \
     "${RAY_ARGS[@]}" &
RAY_PIDS+=($!)

# Workers join once the head's GCS answers.
for _ in $(seq 120); do
    "$PYTHON" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)' \
        "$HEAD_ADDR" "$PORT" 2>/dev/null && break
    sleep 1
done
if [ "$NNODES" -gt 1 ]; then
    srun --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 --exclude="$HEAD_NODE" \
         --cpus-per-task="$CPUS" --open-mode=append --output="$LOG_DIR/ray-worker-%N.out" \
         "$RAY" start --block --address="$ADDRESS" --num-cpus="$CPUS" --num-gpus="$GPUS" --disable-usage-stats \
         "${RAY_ARGS[@]}" &
    RAY_PIDS+=($!)
fi

# The same command line on every run of the job: --resume-or-start continues the search if an
# earlier run saved one. The first trial waits for every node to join.
"$PYTHON" -m dtrain.tune "$CONFIG" "$@" "checkpoint.stop_file=$STOP_FILE" --resume-or-start \
    --address "$ADDRESS" --min-nodes "$NNODES" &
DRIVER_PID=$!
# A trap interrupts `wait`; wait again until the driver has really exited (bash keeps its status).
while kill -0 "$DRIVER_PID" 2>/dev/null; do
    wait "$DRIVER_PID"
done
wait "$DRIVER_PID"
RC=$?
echo "$(date -Is) dtrain.tune exited with $RC; stopping Ray"
stop_ray

PREEMPTED=75  # the search saved its state (and its running trials theirs): run me again
if [ "$RC" -eq "$PREEMPTED" ] && [ "$ENDING" -eq 0 ]; then
    if [ "$RESTART" -ge "${DTRAIN_MAX_RESTARTS:-50}" ]; then
        echo "$(date -Is) search saved; not requeueing after $RESTART restarts (DTRAIN_MAX_RESTARTS)" >&2
        exit "$RC"
    fi
    echo "$(date -Is) search saved; requeueing job $SLURM_JOB_ID (it continues the search)"
    ENDING=1
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "$(date -Is) scontrol requeue failed; resubmit to continue: sbatch slurm/tune.sh $CONFIG $*" >&2
fi
exit "$RC"
