#!/bin/bash
#SBATCH --job-name=loft-retrain
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Retrains every ticket (one per prune.ratios entry) on LOFT_NP ranks (default: the job's task
# count): `--stage retrain`.  Submitted with --dependency=afterok:<prune job>; its shape (nodes,
# tasks, GPUs) is copied from the pretraining job, or set by slurm/chain.sh.
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

loft_stage_job retrain "${LOFT_NP:-${SLURM_NTASKS:-1}}"
