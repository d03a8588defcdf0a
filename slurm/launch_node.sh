#!/bin/bash
# One node's share of a SLURM job (run by slurm/train.sbatch through srun): the machine rank and the
# number of machines come from SLURM's variables, the main address from MAIN_ADDR, and the port from
# the job id unless MAIN_PORT is set (two jobs on one node must not share one): 20000 + id mod 10000,
# below Linux's ephemeral ports.
set -euo pipefail
: "${SLURM_NODEID:?run me through srun (slurm/train.sbatch), or set the SLURM variables}"
NODES=${SLURM_NNODES:-1}
PER_NODE=${GPUS_PER_NODE:-8}
# Several machines cannot meet at a loopback address: where a node's name resolves to 127.0.1.1 (the
# /etc/hosts of Debian and Ubuntu), the other nodes would wait for it until the rendezvous times out.
# LOCAL_NODES=1 says every "node" is this machine (a simulation on one host, as the tests run).
ADDR=$(getent ahostsv4 "${MAIN_ADDR:?}" 2>/dev/null | awk 'NR == 1 {print $1}')
if [ "$NODES" -gt 1 ] && [ "${LOCAL_NODES:-0}" != 1 ] && [[ "${ADDR:-$MAIN_ADDR}" == 127.* ]]; then
    echo "error: MAIN_ADDR $MAIN_ADDR resolves to ${ADDR:-$MAIN_ADDR}, a loopback address that the other $((NODES - 1)) node(s) cannot reach; set MAIN_ADDR to an address of the first node on the network they share (hostname -I there)" >&2
    exit 2
fi
exec accelerate launch -q --config_file "${CONFIG:-accelerate_configs/multi_node.yaml}" \
    --num_machines "$NODES" --num_processes $((NODES * PER_NODE)) --machine_rank "$SLURM_NODEID" \
    --main_process_ip "${MAIN_ADDR:?}" --main_process_port "${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 10000))}" \
    -m accel_pretrain.train --resume auto "$@"
