#!/bin/bash
#SBATCH --job-name=loft-prune
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Finds the tickets (masks) from the pretrained weights: `--stage prune`.  Submitted by a
# pretraining job or slurm/chain.sh with --dependency=afterok:<pretrain job>; the environment
# (LOFT_CONFIG, LOFT_OUT, LOFT_OVERRIDES, ...) comes from the submitter.  Pruning runs on as
# many ranks as the job has tasks (outside SLURM: LOFT_PRUNE_NP, default 1).  One-shot pruning
# is this header's short one-task job (LOFT_PRUNE_NP sets the task count at submission); with
# prune.levels > 1 (IMP: every level but the last is retrained) the submitter gives this job the
# retrain job's shape and time instead (loft_prune_shape in slurm/common.sh).
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

loft_stage_job prune "${SLURM_NTASKS:-${LOFT_PRUNE_NP:-1}}"
