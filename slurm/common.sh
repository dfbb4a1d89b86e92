# shellcheck shell=bash
# Helpers shared by the LoFT SLURM job scripts and slurm/chain.sh.  Source it, do not run it.
#
# A job script finds this file (SLURM runs a *copy* of the script from its spool folder) with:
#   for _d in "${LOFT_REPO:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
#       sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
#     [ -f "$_d/slurm/common.sh" ] && break; done
#   source "$_d/slurm/common.sh"
#
# Environment read here (all optional; see slurm/README.md):
#   LOFT_VENV            virtual environment to activate        (default <repo>/.venv)
#   LOFT_PYTHON          python executable                      (default: the venv's python)
#   LOFT_CONFIG          config file; relative paths are tried in $PWD, then in the repo
#   LOFT_OUT             -> output.dir=...  (made absolute)     LOFT_DATA -> data.root=...
#   LOFT_OVERRIDES       "section.key=value ..." for every stage (split on white space, no globbing)
#   LOFT_<STAGE>_OVERRIDES  extra overrides for PRETRAIN, PRUNE or RETRAIN only
#   LOFT_LAUNCHER        mpirun (default) | srun | none | any launcher taking "-np N CMD..."
#   LOFT_LAUNCHER_ARGS   extra launcher arguments;  LOFT_SRUN_MPI (default pmix)
#   LOFT_OVERSUBSCRIBE=1 mpirun --oversubscribe (more ranks than cores); LOFT_MPI_BIND (default none)
#   LOFT_OMP_THREADS     OMP_NUM_THREADS per rank               (default $SLURM_CPUS_PER_TASK or 1)
#   LOFT_REQUEUE=0       on exit code 3 exit 3 instead of "scontrol requeue" + exit 0
#   LOFT_FORWARD_SIGNAL  signal sent to the launcher on USR1/TERM (default USR1: mpirun passes
#                        USR1 on to every rank, while a TERM makes it kill the ranks)
#   LOFT_SUBMIT_FOLLOWUPS=0  a pretraining job does not submit the prune and retrain jobs
#   LOFT_PARTITION, LOFT_<STAGE>_PARTITION, LOFT_ACCOUNT, LOFT_<STAGE>_TIME, LOFT_LOG_DIR,
#   LOFT_SBATCH_ARGS, LOFT_<STAGE>_SBATCH_ARGS, LOFT_NP, LOFT_PRUNE_NP, LOFT_NODES,
#   LOFT_NTASKS_PER_NODE, LOFT_CPUS_PER_TASK, LOFT_GPUS_PER_NODE, LOFT_MEM: shape of submitted jobs.

LOFT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LOFT_REPO

loft_log() { printf '[loft %s] %s\n' "$(date '+%F %T')" "$*" >&2; }

# loft_die CODE MESSAGE...: log and exit (2 = configuration error, as the program uses).
loft_die() { local code="$1"; shift; loft_log "ERROR: $*"; exit "$code"; }

# loft_split VAR STRING: split STRING on white space into array VAR, without glob expansion
# (an override like prune.ratios=[0.5] is a glob pattern to the shell).
loft_split() { read -r -a "$1" <<< "${2:-}"; }

loft_abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

# Resolve LOFT_CONFIG (in $PWD, else in the repo), make LOFT_OUT / LOFT_DATA / LOFT_LOG_DIR
# absolute and export them, so that jobs submitted from here see the same paths.
loft_resolve_paths() {
  : "${LOFT_CONFIG:=configs/default.yaml}"
  case "$LOFT_CONFIG" in
    /*) ;;
    *) if [ -f "$LOFT_CONFIG" ]; then LOFT_CONFIG="$(loft_abspath "$LOFT_CONFIG")"
       elif [ -f "$LOFT_REPO/$LOFT_CONFIG" ]; then LOFT_CONFIG="$LOFT_REPO/$LOFT_CONFIG"; fi ;;
  esac
  [ -f "$LOFT_CONFIG" ] || loft_die 2 "config file not found: $LOFT_CONFIG (set LOFT_CONFIG)"
  export LOFT_CONFIG
  local v
  for v in LOFT_OUT LOFT_DATA LOFT_LOG_DIR; do
    if [ -n "${!v:-}" ]; then printf -v "$v" '%s' "$(loft_abspath "${!v}")"; export "${v?}"; fi
  done
  if [ -n "${LOFT_LOG_DIR:-}" ]; then mkdir -p "$LOFT_LOG_DIR"; fi
  return 0
}

# Activate the virtual environment and set the per-rank thread count.
loft_activate() {
  local venv="${LOFT_VENV:-$LOFT_REPO/.venv}"
  if [ -z "${LOFT_PYTHON:-}" ]; then
    [ -f "$venv/bin/activate" ] ||
      loft_die 1 "no virtual environment at $venv (run scripts/setup_env.sh or set LOFT_VENV)"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    LOFT_PYTHON="$venv/bin/python"
  fi
  export LOFT_PYTHON
  export OMP_NUM_THREADS="${LOFT_OMP_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  export MKL_NUM_THREADS="$OMP_NUM_THREADS"
}

# loft_launcher_cmd NP: fill array LOFT_LAUNCH_CMD with the command that starts NP ranks.
loft_launcher_cmd() {
  local np="$1" extra=() v
  loft_split extra "${LOFT_LAUNCHER_ARGS:-}"
  case "${LOFT_LAUNCHER:-mpirun}" in
    mpirun)
      LOFT_LAUNCH_CMD=(mpirun -np "$np")
      if [ "$(id -u)" = 0 ]; then LOFT_LAUNCH_CMD+=(--allow-run-as-root); fi
      if [ "${LOFT_OVERSUBSCRIBE:-0}" = 1 ]; then LOFT_LAUNCH_CMD+=(--oversubscribe); fi
      # Open MPI binds each rank to one core by default: that starves data-loader workers.
      LOFT_LAUNCH_CMD+=(--bind-to "${LOFT_MPI_BIND:-none}")
      for v in OMP_NUM_THREADS MKL_NUM_THREADS PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH; do
        if [ -n "${!v:-}" ]; then LOFT_LAUNCH_CMD+=(-x "$v"); fi
      done ;;
    srun)
      # --cpus-per-task is not inherited by srun in SLURM 22.05: pass it on.
      LOFT_LAUNCH_CMD=(srun "--mpi=${LOFT_SRUN_MPI:-pmix}" --ntasks="$np" --kill-on-bad-exit=1)
      if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        LOFT_LAUNCH_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
      fi ;;
    none|"")
      LOFT_LAUNCH_CMD=() ;;
    *)
      loft_split LOFT_LAUNCH_CMD "$LOFT_LAUNCHER"
      LOFT_LAUNCH_CMD+=(-np "$np") ;;
  esac
  LOFT_LAUNCH_CMD+=("${extra[@]}")
}

# loft_stage_cmd STAGE [OVERRIDE...]: fill array LOFT_STAGE_CMD with the python command line.
# Later overrides win: output.dir / data.root, LOFT_OVERRIDES, LOFT_<STAGE>_OVERRIDES, arguments.
loft_stage_cmd() {
  local stage="$1" ov=() part=() s var
  shift
  if [ -n "${LOFT_OUT:-}" ]; then ov+=("output.dir=$LOFT_OUT"); fi
  if [ -n "${LOFT_DATA:-}" ]; then ov+=("data.root=$LOFT_DATA"); fi
  loft_split part "${LOFT_OVERRIDES:-}"; ov+=("${part[@]}")
  for s in ${stage//,/ }; do
    var="LOFT_$(printf '%s' "$s" | tr '[:lower:]' '[:upper:]')_OVERRIDES"
    loft_split part "${!var:-}"; ov+=("${part[@]}")
  done
  LOFT_STAGE_CMD=("${LOFT_PYTHON:-python}" -m loft_hpc.run --config "$LOFT_CONFIG" --stage "$stage"
                  "${ov[@]}" "$@")
}

# ---------------------------------------------------------------- signals and requeue
_loft_on_signal() {
  _LOFT_INTERRUPTED=1
  local fwd="${LOFT_FORWARD_SIGNAL:-USR1}"
  if [ -n "${_LOFT_CHILD:-}" ]; then
    loft_log "got SIG$1: sending SIG$fwd to the launcher (pid $_LOFT_CHILD) to checkpoint and stop"
    kill -s "$fwd" "$_LOFT_CHILD" 2>/dev/null || true
  else
    _LOFT_PENDING=$1
  fi
}

# loft_run_requeueable CMD...: run CMD in the background, pass USR1/TERM on to it (the
# program checkpoints at its next safe point and exits 3), wait for it.  Exit code 3 inside a
# SLURM job: "scontrol requeue $SLURM_JOB_ID" and exit 0 (the job starts again later and the
# stage resumes from its checkpoint).  Otherwise return CMD's exit code.
loft_run_requeueable() {
  local rc=0 rc2=0
  _LOFT_CHILD="" _LOFT_PENDING="" _LOFT_INTERRUPTED=0
  trap '_loft_on_signal USR1' USR1
  trap '_loft_on_signal TERM' TERM
  "$@" &
  _LOFT_CHILD=$!
  if [ -n "$_LOFT_PENDING" ]; then _loft_on_signal "$_LOFT_PENDING"; fi
  while :; do
    _LOFT_INTERRUPTED=0
    wait "$_LOFT_CHILD" && rc=0 || rc=$?
    if [ "$_LOFT_INTERRUPTED" = 1 ] && [ "$rc" -gt 128 ]; then
      # wait was cut short by a trapped signal: wait again (the child may still run, or have
      # ended meanwhile: then bash still holds its status; 127 = that status was already read).
      if kill -0 "$_LOFT_CHILD" 2>/dev/null; then continue; fi
      wait "$_LOFT_CHILD" 2>/dev/null && rc2=0 || rc2=$?
      if [ "$rc2" != 127 ]; then rc=$rc2; fi
    fi
    break
  done
  trap - USR1 TERM
  _LOFT_CHILD=""
  if [ "$rc" = 3 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${LOFT_REQUEUE:-1}" = 1 ]; then
    loft_log "exit code 3 (checkpoint written, stopped on a signal): requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    loft_log "ERROR: scontrol requeue $SLURM_JOB_ID failed; exiting 3"
    exit 3
  fi
  return "$rc"
}

# ---------------------------------------------------------------- running a stage inside a job
loft_job_setup() {
  loft_resolve_paths
  loft_activate
  loft_log "job ${SLURM_JOB_ID:-<none>} (${SLURM_JOB_NAME:-}) run $((${SLURM_RESTART_COUNT:-0} + 1))" \
           "on ${SLURM_JOB_NODELIST:-$(hostname)}: config $LOFT_CONFIG, output ${LOFT_OUT:-<from config>}"
}

# loft_stage STAGE NP [OVERRIDE...]: launch the stage on NP ranks, requeue on exit code 3.
loft_stage() {
  local stage="$1" np="$2" rc=0
  shift 2
  loft_launcher_cmd "$np"
  loft_stage_cmd "$stage" "$@"
  loft_log "running: ${LOFT_LAUNCH_CMD[*]} ${LOFT_STAGE_CMD[*]}"
  loft_run_requeueable "${LOFT_LAUNCH_CMD[@]}" "${LOFT_STAGE_CMD[@]}" || rc=$?
  loft_log "stage $stage finished with exit code $rc"
  return "$rc"
}

# loft_stage_job STAGE NP [OVERRIDE...]: the whole body of a stage job; exits with its code.
loft_stage_job() {
  local rc=0
  loft_job_setup
  loft_stage "$@" || rc=$?
  exit "$rc"
}

# The body of a pretraining job (slurm/pretrain.sh, slurm/<data set>_loft<N>.sh): on its first
# run (not after a requeue) it submits the prune and retrain jobs that depend on it with afterok,
# so that one sbatch runs the whole chain.
loft_pretrain_job() {
  local rc=0
  loft_job_setup
  if [ "${SLURM_RESTART_COUNT:-0}" = 0 ] && [ "${LOFT_SUBMIT_FOLLOWUPS:-1}" = 1 ] \
      && [ -n "${SLURM_JOB_ID:-}" ]; then
    LOFT_INHERIT_SHAPE=1 loft_submit_followups "$SLURM_JOB_ID" ||
      loft_log "WARNING: could not submit the prune/retrain jobs; pretraining goes on"
  fi
  loft_stage pretrain "${LOFT_NP:-${SLURM_NTASKS:-1}}" || rc=$?
  exit "$rc"
}

# ---------------------------------------------------------------- submitting jobs
# loft_sbatch ARGS...: sbatch --parsable, printing the job id.  Inside a job the SLURM_*
# variables of that job are dropped first (sbatch would export them into the new job).
loft_sbatch() {
  (
    for v in ${!SLURM_@}; do
      case "$v" in SLURM_CONF) ;; *) unset "$v" ;; esac
    done
    out="$(sbatch --parsable "$@")" || exit $?
    printf '%s\n' "${out%%;*}"
  )
}

# loft_shape_args STAGE: fill array LOFT_SHAPE with the sbatch options for STAGE (pretrain, prune,
# retrain or snapshots).  Multi-rank stages take LOFT_NP / LOFT_NODES / LOFT_NTASKS_PER_NODE /
# LOFT_CPUS_PER_TASK / LOFT_GPUS_PER_NODE / LOFT_MEM, and with LOFT_INHERIT_SHAPE=1 (inside a pretraining
# job) fall back to that job's own shape, so retraining gets the same nodes, GPUs and memory.
loft_shape_args() {
  local stage="$1" up inherit="${LOFT_INHERIT_SHAPE:-0}" v part=()
  up="$(printf '%s' "$stage" | tr '[:lower:]' '[:upper:]')"
  local job_nodes="" job_ntasks="" job_tpn="" job_cpt="" job_gpn="" job_part="" job_acct="" job_mem=""
  if [ "$inherit" = 1 ]; then
    job_nodes="${SLURM_JOB_NUM_NODES:-}" job_ntasks="${SLURM_NTASKS:-}"
    job_tpn="${SLURM_NTASKS_PER_NODE:-}" job_cpt="${SLURM_CPUS_PER_TASK:-}"
    job_gpn="${SLURM_GPUS_ON_NODE:-}" job_part="${SLURM_JOB_PARTITION:-}"
    job_acct="${SLURM_JOB_ACCOUNT:-}" job_mem="${SLURM_MEM_PER_NODE:+${SLURM_MEM_PER_NODE}M}"
  fi
  LOFT_SHAPE=()
  local cpt="${LOFT_CPUS_PER_TASK:-$job_cpt}" mem="${LOFT_MEM:-$job_mem}"
  if [ "$stage" = prune ]; then
    LOFT_SHAPE+=(--nodes=1 --ntasks="${LOFT_PRUNE_NP:-1}")
  else
    local nodes="${LOFT_NODES:-$job_nodes}" np="${LOFT_NP:-$job_ntasks}"
    local tpn="${LOFT_NTASKS_PER_NODE:-$job_tpn}" gpn="${LOFT_GPUS_PER_NODE:-$job_gpn}"
    if [ -n "$nodes" ]; then LOFT_SHAPE+=(--nodes="$nodes"); fi
    if [ -n "$np" ]; then LOFT_SHAPE+=(--ntasks="$np"); fi
    if [ -n "$tpn" ]; then LOFT_SHAPE+=(--ntasks-per-node="$tpn"); fi
    if [ -n "$gpn" ] && [ "$gpn" != 0 ]; then LOFT_SHAPE+=(--gres="gpu:$gpn"); fi
  fi
  if [ -n "$cpt" ]; then LOFT_SHAPE+=(--cpus-per-task="$cpt"); fi
  if [ -n "$mem" ]; then LOFT_SHAPE+=(--mem="$mem"); fi
  v="LOFT_${up}_PARTITION"; v="${!v:-${LOFT_PARTITION:-$job_part}}"
  if [ -n "$v" ]; then LOFT_SHAPE+=(--partition="$v"); fi
  v="${LOFT_ACCOUNT:-$job_acct}"
  if [ -n "$v" ]; then LOFT_SHAPE+=(--account="$v"); fi
  v="LOFT_${up}_TIME"
  if [ -n "${!v:-}" ]; then LOFT_SHAPE+=(--time="${!v}"); fi
  if [ -n "${LOFT_LOG_DIR:-}" ]; then LOFT_SHAPE+=(--output="$LOFT_LOG_DIR/%x-%j.out"); fi
  loft_split part "${LOFT_SBATCH_ARGS:-}"; LOFT_SHAPE+=("${part[@]}")
  v="LOFT_${up}_SBATCH_ARGS"; loft_split part "${!v:-}"; LOFT_SHAPE+=("${part[@]}")
}

# loft_submit_followups AFTER_ID: submit prune (afterok:AFTER_ID) and retrain (afterok:prune),
# both with --kill-on-invalid-dep=yes; sets LOFT_PRUNE_JOB and LOFT_RETRAIN_JOB and prints
# "prune=<id>" / "retrain=<id>" lines on stdout.
loft_submit_followups() {
  local after="$1"
  loft_shape_args prune
  LOFT_PRUNE_JOB="$(loft_sbatch "${LOFT_SHAPE[@]}" --dependency="afterok:$after" \
      --kill-on-invalid-dep=yes "$LOFT_REPO/slurm/prune.sh")" || return 1
  loft_shape_args retrain
  LOFT_RETRAIN_JOB="$(loft_sbatch "${LOFT_SHAPE[@]}" --dependency="afterok:$LOFT_PRUNE_JOB" \
      --kill-on-invalid-dep=yes "$LOFT_REPO/slurm/retrain.sh")" || return 1
  loft_log "submitted prune job $LOFT_PRUNE_JOB (afterok:$after)" \
           "and retrain job $LOFT_RETRAIN_JOB (afterok:$LOFT_PRUNE_JOB)"
  printf 'prune=%s\nretrain=%s\n' "$LOFT_PRUNE_JOB" "$LOFT_RETRAIN_JOB"
  if [ -n "${LOFT_OUT:-}" ] && mkdir -p "$LOFT_OUT" 2>/dev/null; then
    printf 'after=%s prune=%s retrain=%s submitted=%s\n' "$after" "$LOFT_PRUNE_JOB" \
        "$LOFT_RETRAIN_JOB" "$(date '+%FT%T')" >> "$LOFT_OUT/slurm_jobs.txt"
  fi
}
