#!/bin/bash
#SBATCH --job-name=loft-c10-loft4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=4
#SBATCH --mem=48G
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# LoFT-4 pretraining of PreResNet-34 on CIFAR-10 (python pickle batches, cifar-10-batches-py/).
#   4 MPI ranks = 1 node(s) x 4 rank(s), one rank per GPU (--gres=gpu:N per node = ranks per
#   node); --cpus-per-task feeds the data loader of each rank.  Adapt partition/account/GPU type
#   to your cluster (--partition=..., --account=..., --gres=gpu:a100:4) here or on the sbatch
#   command line; keep ranks per node = GPUs per node.  --mem is per node.
#
# Submit from a run folder (logs <job name>-<id>.out and runs/ go there; slurm/README.md):
#   cd /scratch/$USER/run && LOFT_DATA=/path/to/cifar sbatch ~/loft_hpc/slurm/cifar10_loft4.sh
# CPU nodes / one small machine (command-line options override these headers):
#   LOFT_DATA=/path/to/cifar LOFT_NP=<ranks> sbatch --gres=none --nodes=1 --ntasks-per-node=<cores> \
#       --cpus-per-task=1 --mem=4G ~/loft_hpc/slurm/cifar10_loft4.sh
# This job is the pretraining; on its first run (SLURM_RESTART_COUNT unset) it submits the prune
# and retrain jobs with --dependency=afterok:$SLURM_JOB_ID, so this one sbatch runs the chain.
# SIGUSR1 300 s before the time limit -> checkpoint, exit 3 -> scontrol requeue -> resume.
# Config: $LOFT_CONFIG (default configs/cifar10_preresnet34_loft4.yaml);
# outputs: $LOFT_OUT (default runs/cifar10_preresnet34_loft4 under the submit folder).  More: slurm/README.md.
set -uo pipefail
# SLURM runs a copy of this script from its spool folder: find the repository (LOFT_REPO, the
# submitted script's path, the submit folder, or next to this file) and its slurm/common.sh.
for _d in "${LOFT_REPO:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
    sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")/.." "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
  [ -f "$_d/slurm/common.sh" ] && break
done
[ -f "$_d/slurm/common.sh" ] || { echo "cannot find slurm/common.sh: set LOFT_REPO" >&2; exit 1; }
# shellcheck source=slurm/common.sh
source "$_d/slurm/common.sh"

: "${LOFT_CONFIG:=configs/cifar10_preresnet34_loft4.yaml}"
: "${LOFT_OUT:=runs/cifar10_preresnet34_loft4}"
loft_pretrain_job
