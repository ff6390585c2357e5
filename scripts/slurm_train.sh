#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each runs `accelerate launch` with its
# node rank; every node starts GPUS_PER_NODE processes and they join one DeepSpeed world.
#
#   sbatch --nodes 4 scripts/slurm_train.sh --config configs/cxr_mae_llama_pretrain.yaml \
#       model.llama.checkpoint=/models/Llama-2-7b-hf
#
# Environment: GPUS_PER_NODE (default: the GPUs SLURM gives the job on a node, else 8),
# MASTER_PORT (29500), ACCELERATE_CONFIG (configs/accelerate/multinode_zero2.yaml), and
# DEEPSPEED_CONFIG to use another ZeRO JSON (e.g. configs/deepspeed/zero3.json).
#SBATCH --job-name=medalign
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs
NODES=${SLURM_NNODES:?run under sbatch / salloc (SLURM_NNODES is not set)}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multinode_zero2.yaml}
EXTRA=()
if [ -n "${DEEPSPEED_CONFIG:-}" ]; then EXTRA+=(--deepspeed_config_file "$DEEPSPEED_CONFIG"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false
echo "nodes=$NODES gpus/node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT"
# One srun task per node; SLURM_NODEID is the machine rank. The single quotes keep the
# variable for the remote shell.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$0" \
    --num_machines "$1" --num_processes "$(( $1 * $2 ))" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$3" --main_process_port "$4" "${@:5}"' \
  "$ACCELERATE_CONFIG" "$NODES" "$GPUS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" \
  "${EXTRA[@]}" train.py "$@"
