#!/bin/bash
# A one-node SLURM cluster on this machine: munged, slurmctld and slurmd, for running the
# launch scripts under a real scheduler (tests/test_slurm.py). Needs root and Debian's
# slurm-wlm and munge packages.
#
#   unshare --pid --fork --kill-child --mount-proc \
#     launch/slurm_local.sh DIR CTLD_PORT SLURMD_PORT [CPUS] &
#   export SLURM_CONF=DIR/slurm.conf   # then sbatch, squeue, scancel, scontrol as usual
#
# It stays in the foreground; in its own PID namespace (unshare), killing it kills the
# daemons and every process of every job with them. The node offers CPUS (default 8) CPUs,
# more than the machine may have, and as many stand-in GPUs, so that scripts asking for
# --gpus-per-task are scheduled; JAX, finding no GPU, runs on the CPU.
set -euo pipefail
dir=$(realpath "$1")
ctld_port=$2
slurmd_port=$3
cpus=${4:-8}
mkdir -p "$dir"/{state,spool,log,munge}
chmod 700 "$dir/munge"
head -c 1024 /dev/urandom >"$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
socket="$dir/munge/munge.socket"
munged --force --key-file="$dir/munge/munge.key" --socket="$socket" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
  --seed-file="$dir/munge/munged.seed"
cat >"$dir/slurm.conf" <<CONF
ClusterName=ar_jax_local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MpiDefault=none
# Schedule every second, not every minute: a requeued job starts once its wait is over.
SchedulerParameters=sched_interval=1
NodeName=localhost CPUs=$cpus Gres=gpu:$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
# The GPUs: character devices that are /dev/null (slurmd counts device files, not GPUs).
for i in $(seq 0 $((cpus - 1))); do
  [ -e "$dir/gpu$i" ] || mknod "$dir/gpu$i" c 1 3
done
echo "Name=gpu File=$dir/gpu[0-$((cpus - 1))]" >"$dir/gres.conf"
export SLURM_CONF="$dir/slurm.conf"
slurmctld -D -i &
slurmd -D -N localhost &
wait
