#!/bin/bash
# Submit the LoFT pipeline as three SLURM jobs and print their ids, one a line:
#   pretrain                                         (slurm/pretrain.sh)
#   prune    --dependency=afterok:<pretrain> --kill-on-invalid-dep=yes   (slurm/prune.sh)
#   retrain  --dependency=afterok:<prune>    --kill-on-invalid-dep=yes   (slurm/retrain.sh)
# and, when LOFT_SNAPSHOTS is set ("1ep 2ep 5ep"), a fourth id: the job array
# slurm/retrain_snapshots_array.sh (one task per snapshot, afterok:<pretrain>).  Each task writes
# only its own files (tickets@<step>_pNN.h5, retrain@<step>_pNN.h5); the end-of-pretraining
# ticket is the prune/retrain jobs' work, so "end" (or a step listed twice) is refused (exit 2)
# before anything is submitted.
# A failed stage cancels the stages after it; a stage stopped by a signal requeues itself.
# Before anything is submitted every job is checked with `sbatch --test-only`: a job that could
# never start on this cluster (a shape no node or partition offers) is one line and exit 2.
#
# Usage (from anywhere; run with bash, not sbatch):
#   LOFT_CONFIG=configs/default.yaml LOFT_OUT=runs/digits LOFT_NP=4 bash slurm/chain.sh
# Environment:
#   LOFT_CONFIG      config file (default configs/default.yaml; relative: $PWD, then the repo)
#   LOFT_OUT         output folder for every stage (-> output.dir=..., made absolute)
#   LOFT_DATA        data folder (-> data.root=...)
#   LOFT_OVERRIDES   "section.key=value ..." for every stage; LOFT_{PRETRAIN,PRUNE,RETRAIN}_OVERRIDES
#   LOFT_NP          ranks of pretraining and retraining (default 4);  LOFT_PRUNE_NP (default 1;
#                    with prune.levels > 1 the prune job gets the retrain job's ranks and time)
#   LOFT_NODES, LOFT_NTASKS_PER_NODE, LOFT_CPUS_PER_TASK, LOFT_GPUS_PER_NODE, LOFT_MEM
#   LOFT_PARTITION, LOFT_{PRETRAIN,PRUNE,RETRAIN,SNAPSHOTS}_PARTITION, LOFT_ACCOUNT
#   LOFT_{PRETRAIN,PRUNE,RETRAIN,SNAPSHOTS}_TIME   time limits (defaults: the scripts' headers)
#   LOFT_SBATCH_ARGS, LOFT_{PRETRAIN,...}_SBATCH_ARGS   any other sbatch options (e.g. --overcommit
#                    for more ranks than cores on one small machine)
#   LOFT_LOG_DIR     job logs go to $LOFT_LOG_DIR/<job name>-<job id>.out (default: the folder
#                    chain.sh runs in, as sbatch does)
#   LOFT_CHECK_FOLLOWUPS=0  skip the sbatch --test-only check that every job could start
#   LOFT_LAUNCHER, LOFT_OVERSUBSCRIBE, LOFT_VENV ...  read by the jobs (see slurm/common.sh)
#   HOROVOD_STALL_CHECK_TIME_SECONDS, HOROVOD_STALL_SHUTDOWN_TIME_SECONDS  stall check of the ranks
#                    (defaults 60 / 600 s: a stuck collective fails the job after 10 minutes)
set -euo pipefail
# shellcheck source=slurm/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

command -v sbatch >/dev/null || loft_die 1 "sbatch not found: run this on a SLURM login node"
loft_resolve_paths
: "${LOFT_NP:=4}"
export LOFT_NP
if [ -n "${LOFT_SNAPSHOTS:-}" ]; then
  loft_split snaps "$LOFT_SNAPSHOTS"
  loft_check_snapshots "${snaps[@]}" || exit 2
fi

loft_resolve_out

# Every job must be able to start on this cluster (sbatch --test-only) before any is submitted:
# one line naming the job and SLURM's reason, exit 2, nothing queued.
loft_shape_args pretrain
pretrain_shape=("${LOFT_SHAPE[@]}")
loft_can_start pretrain "$LOFT_REPO/slurm/pretrain.sh" "${pretrain_shape[@]}" || exit 2
loft_prune_shape
loft_can_start prune "$LOFT_REPO/slurm/prune.sh" "${LOFT_SHAPE[@]}" || exit 2
loft_shape_args retrain
loft_can_start retrain "$LOFT_REPO/slurm/retrain.sh" "${LOFT_SHAPE[@]}" || exit 2
if [ -n "${LOFT_SNAPSHOTS:-}" ]; then
  loft_shape_args snapshots
  loft_can_start snapshots "$LOFT_REPO/slurm/retrain_snapshots_array.sh" "${LOFT_SHAPE[@]}" || exit 2
fi
pretrain_job="$(LOFT_SUBMIT_FOLLOWUPS=0 loft_sbatch "${pretrain_shape[@]}" "$LOFT_REPO/slurm/pretrain.sh")" ||
  loft_die 1 "could not submit the pretraining job"
loft_log "submitted pretrain job $pretrain_job (config $LOFT_CONFIG, output ${LOFT_OUT:-<from config>})"
# loft_submit_followups prints prune=/retrain= lines: keep stdout for the bare ids.
rc=0
loft_submit_followups "$pretrain_job" >/dev/null || rc=$?
if [ "$rc" != 0 ]; then
  scancel "$pretrain_job" 2>/dev/null || true
  loft_die "$rc" "the prune/retrain jobs were not submitted: pretrain job $pretrain_job cancelled"
fi
printf '%s\n' "$pretrain_job" "$LOFT_PRUNE_JOB" "$LOFT_RETRAIN_JOB"

if [ -n "${LOFT_SNAPSHOTS:-}" ]; then
  export LOFT_SNAPSHOTS
  loft_shape_args snapshots
  snap_job="$(loft_sbatch "${LOFT_SHAPE[@]}" --array="0-$((${#snaps[@]} - 1))" \
      --dependency="afterok:$pretrain_job" --kill-on-invalid-dep=yes \
      "$LOFT_REPO/slurm/retrain_snapshots_array.sh")" || loft_die 1 "could not submit the snapshot array"
  loft_log "submitted snapshot array $snap_job (${snaps[*]}, afterok:$pretrain_job)"
  printf '%s\n' "$snap_job"
fi
