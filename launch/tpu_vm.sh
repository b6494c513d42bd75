#!/bin/bash
# One ar_jax run on a multi-host Cloud TPU VM: the same command on every worker; JAX finds
# the other hosts itself.
#
#   launch/tpu_vm.sh my-tpu us-central2-b experiments/shakespeare_char.py:preset=nanogpt_gpu \
#       /mnt/shared/workdirs/shakespeare_tpu [--config.model.dtype=bfloat16 ...]
#
# Each worker needs this repository at ~/ar_jax, installed with `pip install -e .`
# (`gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...` does that
# too), and the workdir on a filesystem every worker sees.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1
zone=$2
config=$3
workdir=$4
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="\
  cd ~/ar_jax && python -m ar_jax.main --config='$config' --workdir='$workdir' $*"
