#!/bin/bash
# One node's share of a SLURM job (run by slurm/train.sbatch through srun): the machine rank and the
# number of machines come from SLURM's variables, the main address from MAIN_ADDR, and the port from
# the job id unless MAIN_PORT is set (two jobs on one node must not share one): 20000 + id mod 10000,
# below Linux's ephemeral ports.
set -euo pipefail
: "${SLURM_NODEID:?run me through srun (slurm/train.sbatch), or set the SLURM variables}"
NODES=${SLURM_NNODES:-1}
PER_NODE=${GPUS_PER_NODE:-8}
exec accelerate launch -q --config_file "${CONFIG:-accelerate_configs/multi_node.yaml}" \
    --num_machines "$NODES" --num_processes $((NODES * PER_NODE)) --machine_rank "$SLURM_NODEID" \
    --main_process_ip "${MAIN_ADDR:?}" --main_process_port "${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 10000))}" \
    -m accel_pretrain.train --resume auto "$@"
