#!/bin/bash
# fedjax_eff on a multi-host Cloud TPU VM slice (e.g. v4-32: 4 hosts), run
# from your workstation with gcloud (an example to adapt).
#
#   TPU=my-tpu ZONE=us-central2-b NFS=10.0.0.2:/share \
#       bash launch/tpu_vm_example.sh [--config.num_rounds=500 ...]
#
# 1. copies this checkout to every worker and installs it with JAX for TPU;
# 2. mounts a shared file system on every worker (a Filestore NFS share,
#    $NFS) at /mnt/shared: --workdir must be one directory that every host
#    sees; a bucket is not enough (the run renames files atomically and
#    locks the workdir);
# 3. runs launch/train.py on all workers at once (--worker=all) with
#    --distributed: on Cloud TPU, jax.distributed.initialize() reads the
#    coordinator, process count and process id from the TPU metadata, so
#    no other flag is needed.
#
# Every host loads the whole dataset and packs only the clients of its own
# TPU chips; host 0 writes metrics.jsonl and summary.json, all hosts share
# checkpoints/. Running step 3 again resumes from the newest checkpoint.
# The run lives as long as this ssh session: start it from tmux or screen,
# or wrap the command in nohup ... & with a log file per worker.
#
# The TPU VM itself, once (see `gcloud compute tpus tpu-vm create --help`):
#   gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" \
#       --accelerator-type=v4-32 --version=tpu-ubuntu2204-base

set -euo pipefail

TPU=${TPU:?set TPU to the TPU VM name}
ZONE=${ZONE:?set ZONE to its zone}
NFS=${NFS:-}                   # host:/export of a shared file system
CONFIG=${CONFIG:-configs/default.py}
WORKDIR=${WORKDIR:-/mnt/shared/runs/tpu}
REMOTE=fedjax_eff              # the checkout's folder in each worker's home

on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
      --command="$1"
}

# 1. Code and environment on every worker (Python >= 3.11; Ubuntu 22.04
#    images ship 3.10, so apt installs 3.11 beside it).
cd "$(dirname "$0")/.."
on_all "sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 \
    python3.11-venv nfs-common && mkdir -p $REMOTE"
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
    fedjax_eff launch configs setup.cfg pyproject.toml README.md \
    "$TPU":"$REMOTE"/
on_all "cd $REMOTE && python3.11 -m venv .venv && .venv/bin/pip install -q \
    -e . 'jax[tpu]>=0.10,<0.11'"

# 2. The shared workdir.
if [[ -n "$NFS" ]]; then
  on_all "sudo mkdir -p /mnt/shared && (mountpoint -q /mnt/shared || \
      sudo mount -t nfs -o vers=4.1 $NFS /mnt/shared) && \
      sudo chmod a+rwx /mnt/shared"
fi

# 3. Train: the same command on every host.
extra=$(printf '%q ' "$@")
on_all "cd $REMOTE && .venv/bin/python launch/train.py \
    --config=$CONFIG --workdir=$WORKDIR --distributed \
    --config.mesh_clients=-1 --config.progress=false $extra"
