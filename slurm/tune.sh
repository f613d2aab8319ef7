#!/bin/bash
# A Ray Tune search inside a SLURM allocation: a Ray head on the first node, a Ray worker on
# every other node (each in its own srun step), and the Tune driver on the first node.
#
#   sbatch slurm/tune.sh CONFIG [key=value ...]
#   sbatch --nodes=4 --gres=gpu:8 slurm/tune.sh examples/tiny_alpaca.yaml
#
# The options below are defaults: edit them, or override any of them on the sbatch command line.
#SBATCH --job-name=dtrain-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one Ray node per SLURM node
#SBATCH --cpus-per-task=16
##SBATCH --gres=gpu:8
##SBATCH --partition=gpu
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Environment knobs: DTRAIN_PYTHON (default: python), DTRAIN_RAY (default: ray), and RAY_AUTH_MODE,
# which reaches ray start and the driver alike (both inherit this script's environment).
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
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
CPUS=${SLURM_CPUS_PER_TASK:-1}
GPUS=${SLURM_GPUS_ON_NODE:-0}

# The head is the first node, where this script runs; its address comes from SLURM (NodeAddr),
# since node names need not resolve.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
ADDRESS=$HEAD_ADDR:$PORT
echo "$(date -Is) job $SLURM_JOB_ID: Ray head on $HEAD_NODE ($ADDRESS), $NNODES node(s) x $CPUS CPU(s), $GPUS GPU(s)"

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
}
trap 'stop_ray; exit 143' TERM
trap 'stop_ray' EXIT

srun --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --cpus-per-task="$CPUS" \
     "$RAY" start --head --block --node-ip-address="$HEAD_ADDR" --port="$PORT" \
     --num-cpus="$CPUS" --num-gpus="$GPUS" --temp-dir="/tmp/ray-$SLURM_JOB_ID" --disable-usage-stats &
RAY_PIDS+=($!)

# Workers join once the head's GCS answers.
for _ in $(seq 120); do
    "$PYTHON" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)' \
        "$HEAD_ADDR" "$PORT" 2>/dev/null && break
    sleep 1
done
if [ "$NNODES" -gt 1 ]; then
    srun --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 --exclude="$HEAD_NODE" \
         --cpus-per-task="$CPUS" \
         "$RAY" start --block --address="$ADDRESS" --num-cpus="$CPUS" --num-gpus="$GPUS" --disable-usage-stats &
    RAY_PIDS+=($!)
fi

"$PYTHON" -m dtrain.tune "$CONFIG" "$@" --address "$ADDRESS"
RC=$?
echo "$(date -Is) dtrain.tune exited with $RC; stopping Ray"
exit "$RC"
