#!/bin/bash
#SBATCH --job-name=loft-snapshots
#SBATCH --array=0-2
#SBATCH --ntasks=4
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
#
# "Evaluate snapshots of tickets during training by rewinding & retraining": array task i takes
# the i-th word of LOFT_SNAPSHOTS (default "1ep 2ep 5ep"), finds the ticket from that
# pretraining snapshot and retrains it:
#   --stage prune,retrain prune.mask_from=<step>   -> tickets@<step>_p50.h5, retrain@<step>_p50.h5 ...
# Every step must be listed in the config's output.snapshot_weights.  A task writes only its own
# files (tickets@<step>_pNN.h5, retrain@<step>_pNN.h5, ckpt/retrain@<step>_pNN/, imp/...), so the
# array runs beside the chain's prune and retrain jobs on the same output folder.  The ticket of
# the end of pretraining (tickets_pNN.h5, retrain_pNN.h5) is those jobs' work: "end", or a step
# listed twice, is refused (exit 2) instead of racing them on the same files.
# Make the array range match the list, after the pretraining job:
#   LOFT_SNAPSHOTS="1ep 2ep 5ep" LOFT_OUT=... sbatch --array=0-2 \
#       --dependency=afterok:<pretrain job> slurm/retrain_snapshots_array.sh
# (slurm/chain.sh does this when LOFT_SNAPSHOTS is set.)  When every task is done,
# `loft-tools tickets $LOFT_OUT --plot tickets.png` compares them with the end's ticket.
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

loft_split _snaps "${LOFT_SNAPSHOTS:-1ep 2ep 5ep}"
loft_check_snapshots "${_snaps[@]}" || exit 2
_i="${SLURM_ARRAY_TASK_ID:-${LOFT_SNAPSHOT_INDEX:-}}"
[ -n "$_i" ] || loft_die 2 "not an array task: set SLURM_ARRAY_TASK_ID or LOFT_SNAPSHOT_INDEX"
if [ "$_i" -ge "${#_snaps[@]}" ]; then
  loft_log "WARNING: array task $_i has no snapshot in LOFT_SNAPSHOTS (${#_snaps[@]} steps); nothing to do"
  exit 0
fi
loft_log "array task $_i: ticket from snapshot ${_snaps[$_i]}"
loft_stage_job prune,retrain "${LOFT_NP:-${SLURM_NTASKS:-1}}" "prune.mask_from=${_snaps[$_i]}"
