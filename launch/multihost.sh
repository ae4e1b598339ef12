#!/usr/bin/env bash
# Hosts without a scheduler: start the same command on every host with an explicit
# coordinator (host 0's address and a free port), the process count and this host's rank.
#
#   host0$ bash launch/multihost.sh host0:12355 2 0 --config configs/stage2.py --workdir /shared/run
#   host1$ bash launch/multihost.sh host0:12355 2 1 --config configs/stage2.py --workdir /shared/run
#
# The same settings can come from config (--config.distributed.coordinator_address=...,
# num_processes, process_id). Try it on one machine with CPU devices:
#   XLA_FLAGS=--xla_force_host_platform_device_count=4 bash launch/multihost.sh 127.0.0.1:12355 2 0 ... &
#   XLA_FLAGS=--xla_force_host_platform_device_count=4 bash launch/multihost.sh 127.0.0.1:12355 2 1 ...
set -euo pipefail
coordinator=${1:?coordinator host:port}; count=${2:?number of processes}; rank=${3:?this process id}
shift 3
cd "$(dirname "$0")/.."
MMJAX_COORDINATOR_ADDRESS=$coordinator MMJAX_NUM_PROCESSES=$count MMJAX_PROCESS_ID=$rank \
  exec "${PYTHON:-.venv/bin/python}" -m mmjax.train "$@"
