# shellcheck shell=bash
# Helpers shared by the LoFT SLURM job scripts and slurm/chain.sh.  Source it, do not run it.
#
# A job script finds this file (SLURM runs a *copy* of the script from its spool folder) with:
#   for _d in "${LOFT_REPO:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
#       sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)")/.." "${SLURM_SUBMIT_DIR:-.}" "$(dirname "$0")/.."; do
#     [ -f "$_d/slurm/common.sh" ] && break; done
#   source "$_d/slurm/common.sh"
# (head -n 1: for the array task that carries the array's own job id, scontrol shows every task.)
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
#   HOROVOD_STALL_CHECK_TIME_SECONDS (default 60), HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (default
#                        600): Horovod's stall check, exported to every rank by the launcher:
#                        a collective that some ranks entered and others did not for the
#                        shutdown time ends the job (0 = warn only)
#   LOFT_OVERSUBSCRIBE=1 mpirun --oversubscribe (more ranks than cores); LOFT_MPI_BIND (default none)
#   LOFT_OMP_THREADS     OMP_NUM_THREADS per rank               (default $SLURM_CPUS_PER_TASK or 1)
#   LOFT_REQUEUE=0       on exit code 3 exit 3 instead of "scontrol requeue" + exit 0
#   LOFT_FORWARD_SIGNAL  signal sent to the launcher on USR1/TERM (default USR1: mpirun passes
#                        USR1 on to every rank, while a TERM makes it kill the ranks)
#   LOFT_SUBMIT_FOLLOWUPS=0  a pretraining job does not submit the prune and retrain jobs
#   LOFT_CHECK_FOLLOWUPS=0   do not ask `sbatch --test-only` whether the follow-ups could ever start
#   LOFT_PARTITION, LOFT_<STAGE>_PARTITION, LOFT_ACCOUNT, LOFT_<STAGE>_TIME, LOFT_LOG_DIR,
#   LOFT_SBATCH_ARGS, LOFT_<STAGE>_SBATCH_ARGS, LOFT_NP, LOFT_PRUNE_NP, LOFT_NODES,
#   LOFT_NTASKS_PER_NODE, LOFT_CPUS_PER_TASK, LOFT_GPUS_PER_NODE, LOFT_MEM: shape of submitted jobs
#                        (loft_shape_args says how each is derived).

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

# loft_resolve_out: when LOFT_OUT is not set, set (and export) it to the output.dir of the config
# with its overrides, made absolute: the jobs of a chain, the requeue message and slurm_jobs.txt
# then all name the same folder.  Left unset when the config cannot be read here.
loft_resolve_out() {
  local dir
  if [ -n "${LOFT_OUT:-}" ]; then return 0; fi
  dir="$(loft_config_value output.dir pretrain 2>/dev/null)" || dir=""
  if [ -n "$dir" ]; then LOFT_OUT="$(loft_abspath "$dir")"; export LOFT_OUT; fi
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

# loft_stall_check: export Horovod's stall check for the ranks (scripts/mpirun.sh does the same
# outside SLURM).  A collective that some ranks entered while others never do (a dead or stuck
# rank, a rank on another code path) would otherwise hold the whole allocation until the time
# limit; with these Horovod warns after HOROVOD_STALL_CHECK_TIME_SECONDS and shuts down after
# HOROVOD_STALL_SHUTDOWN_TIME_SECONDS: every rank gets an error and the job fails (exit 1),
# which cancels its afterok dependents.  Set either on the sbatch command line to change it;
# HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=0 only warns.  Values must be whole seconds.
loft_stall_check() {
  local v shutdown="${HOROVOD_STALL_SHUTDOWN_TIME_SECONDS:-600}" check
  check="${HOROVOD_STALL_CHECK_TIME_SECONDS:-60}"
  for v in "$check" "$shutdown"; do
    case "$v" in
      ''|*[!0-9]*) loft_die 2 "HOROVOD_STALL_CHECK_TIME_SECONDS / HOROVOD_STALL_SHUTDOWN_TIME_SECONDS:" \
                              "expected whole seconds, got '$v'" ;;
    esac
  done
  # Horovod checks for a stall every check interval: a shutdown time below the default check
  # time would only act at the next check, so the default check time follows it down.
  if [ -z "${HOROVOD_STALL_CHECK_TIME_SECONDS:-}" ] && [ "$shutdown" -gt 0 ] && [ "$shutdown" -lt "$check" ]; then
    check="$shutdown"
  fi
  export HOROVOD_STALL_CHECK_TIME_SECONDS="$check" HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="$shutdown"
}

# loft_launcher_cmd NP: fill array LOFT_LAUNCH_CMD with the command that starts NP ranks (and
# export the stall check, which every launcher hands to the ranks: mpirun with -x, srun and
# other launchers with the environment).
loft_launcher_cmd() {
  local np="$1" extra=() v
  loft_stall_check
  loft_split extra "${LOFT_LAUNCHER_ARGS:-}"
  case "${LOFT_LAUNCHER:-mpirun}" in
    mpirun)
      # --quiet: no "Primary job terminated normally, but 1 process returned a non-zero exit
      # code ... aborted" banner when the ranks exit 3 after a checkpoint (or 2 on bad input):
      # the program and loft_run_requeueable say what happened in one line each.  mpirun then
      # says nothing about a rank that was killed, so loft_stage does.
      LOFT_LAUNCH_CMD=(mpirun --quiet -np "$np")
      if [ "$(id -u)" = 0 ]; then LOFT_LAUNCH_CMD+=(--allow-run-as-root); fi
      if [ "${LOFT_OVERSUBSCRIBE:-0}" = 1 ]; then
        LOFT_LAUNCH_CMD+=(--oversubscribe)
      elif [ -n "${SLURM_NTASKS:-}" ] && [ "$np" -gt "$SLURM_NTASKS" ]; then
        # LOFT_NP ranks in an allocation of fewer tasks (a small machine: 4 ranks on 2 cores)
        loft_log "$np ranks on the job's $SLURM_NTASKS task slots: mpirun --oversubscribe"
        LOFT_LAUNCH_CMD+=(--oversubscribe)
      fi
      # Open MPI binds each rank to one core by default: that starves data-loader workers.
      LOFT_LAUNCH_CMD+=(--bind-to "${LOFT_MPI_BIND:-none}")
      for v in OMP_NUM_THREADS MKL_NUM_THREADS PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH \
               HOROVOD_STALL_CHECK_TIME_SECONDS HOROVOD_STALL_SHUTDOWN_TIME_SECONDS; do
        if [ -n "${!v:-}" ]; then LOFT_LAUNCH_CMD+=(-x "$v"); fi
      done ;;
    srun)
      # --cpus-per-task is not inherited by srun in SLURM 22.05: pass it on.
      LOFT_LAUNCH_CMD=(srun "--mpi=${LOFT_SRUN_MPI:-pmix}" --ntasks="$np" --kill-on-bad-exit=1)
      if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        LOFT_LAUNCH_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
      fi
      if [ -n "${SLURM_NTASKS:-}" ] && [ "$np" -gt "$SLURM_NTASKS" ]; then
        loft_log "$np ranks on the job's $SLURM_NTASKS task slots: srun --overcommit"
        LOFT_LAUNCH_CMD+=(--overcommit)
      fi ;;
    none|"")
      LOFT_LAUNCH_CMD=() ;;
    *)
      loft_split LOFT_LAUNCH_CMD "$LOFT_LAUNCHER"
      LOFT_LAUNCH_CMD+=(-np "$np") ;;
  esac
  LOFT_LAUNCH_CMD+=("${extra[@]}")
}

# loft_stage_overrides STAGE: fill array LOFT_STAGE_OVERRIDES with the overrides of STAGE (a
# comma list).  Later ones win: output.dir / data.root, LOFT_OVERRIDES, LOFT_<STAGE>_OVERRIDES.
loft_stage_overrides() {
  local stage="$1" part=() s var
  LOFT_STAGE_OVERRIDES=()
  if [ -n "${LOFT_OUT:-}" ]; then LOFT_STAGE_OVERRIDES+=("output.dir=$LOFT_OUT"); fi
  if [ -n "${LOFT_DATA:-}" ]; then LOFT_STAGE_OVERRIDES+=("data.root=$LOFT_DATA"); fi
  loft_split part "${LOFT_OVERRIDES:-}"; LOFT_STAGE_OVERRIDES+=("${part[@]}")
  for s in ${stage//,/ }; do
    var="LOFT_$(printf '%s' "$s" | tr '[:lower:]' '[:upper:]')_OVERRIDES"
    loft_split part "${!var:-}"; LOFT_STAGE_OVERRIDES+=("${part[@]}")
  done
}

# loft_stage_cmd STAGE [OVERRIDE...]: fill array LOFT_STAGE_CMD with the python command line
# (the overrides of loft_stage_overrides, then the arguments: later ones win).
loft_stage_cmd() {
  local stage="$1"
  shift
  loft_stage_overrides "$stage"
  LOFT_STAGE_CMD=("${LOFT_PYTHON:-python}" -m loft_hpc.run --config "$LOFT_CONFIG" --stage "$stage"
                  "${LOFT_STAGE_OVERRIDES[@]}" "$@")
}

# ---------------------------------------------------------------- signals and requeue
_loft_on_signal() {
  _LOFT_INTERRUPTED=1
  local fwd="${LOFT_FORWARD_SIGNAL:-USR1}" pid ranks=""
  if [ -n "${_LOFT_CHILD:-}" ]; then
    loft_log "got SIG$1: sending SIG$fwd to the launcher (pid $_LOFT_CHILD) to checkpoint and stop"
    kill -s "$fwd" "$_LOFT_CHILD" 2>/dev/null || true
    # Some Open MPI builds do not pass USR1 on (4.1.6 of Ubuntu 24.04: mpirun swallows it), so the
    # ranks that mpirun started on this node, its own children, get it directly too (a rank that
    # gets it twice only sets its flag twice).  Launchers of remote processes (srun, ssh, orted)
    # are left alone: mpirun's forwarding, or srun's, covers the other nodes.
    if [[ "$(cat "/proc/$_LOFT_CHILD/comm" 2>/dev/null)" =~ ^(mpirun|mpiexec|orterun|prterun)$ ]]; then
      for pid in $(pgrep -P "$_LOFT_CHILD" 2>/dev/null); do
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
          ''|srun|ssh|rsh|orted|prted) ;;
          *) kill -s "$fwd" "$pid" 2>/dev/null && ranks+=" $pid" ;;
        esac
      done
      if [ -n "$ranks" ]; then loft_log "... and to its ranks on this node (pids$ranks)"; fi
    fi
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
    # The run's last line says what was saved and what happens next (a requeue is not a crash).
    # SLURM takes a requeued job back by writing "*** JOB <id> ON <node> CANCELLED AT <time> DUE
    # TO JOB REQUEUE ***" into its log and sending SIGTERM (SIGKILL KillWait seconds later): wait
    # for that TERM (at most 60 s), then print the line, so that it comes after SLURM's.
    local run=$((${SLURM_RESTART_COUNT:-0} + 1)) what n=0
    what="$(loft_last_checkpoint)"
    _LOFT_TAKEN=0
    trap '_LOFT_TAKEN=1' TERM
    if scontrol requeue "$SLURM_JOB_ID"; then
      while [ "$_LOFT_TAKEN" = 0 ] && [ "$n" -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
      loft_log "job $SLURM_JOB_ID run $run: ${what:-stopped after a checkpoint} (exit code 3);" \
               "requeued, run $((run + 1)) resumes from there"
      exit 0
    fi
    trap - TERM
    loft_log "ERROR: scontrol requeue $SLURM_JOB_ID failed; exiting 3 (submit the same job again to resume)"
    exit 3
  fi
  return "$rc"
}

# loft_last_checkpoint: "<stage> checkpointed at step <N> (<file>)" for the newest checkpoint
# under $LOFT_OUT/ckpt (the one a stop for requeue has just written), or nothing.
loft_last_checkpoint() {
  local latest f step
  if [ -z "${LOFT_OUT:-}" ] || [ ! -d "$LOFT_OUT/ckpt" ]; then return 0; fi
  # shellcheck disable=SC2012
  latest="$(ls -t "$LOFT_OUT"/ckpt/*/LATEST 2>/dev/null | head -n 1)"
  if [ -z "$latest" ]; then return 0; fi
  f="$(head -n 1 "$latest")"
  step="${f#ckpt-}"; step="${step%.h5}"
  case "$step" in ''|*[!0-9]*) return 0 ;; esac
  printf '%s checkpointed at step %s (%s)\n' "$(basename "$(dirname "$latest")")" "$((10#$step))" \
      "${latest%/LATEST}/$f"
}

# ---------------------------------------------------------------- running a stage inside a job
loft_job_setup() {
  loft_resolve_paths
  loft_activate
  loft_resolve_out
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
  if [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then
    loft_log "ERROR: a rank of stage $stage ended on signal $((rc - 128)) (launcher exit $rc): killed" \
             "(out of memory, scancel, node failure?); the other ranks were stopped"
  fi
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
    # A chain that cannot complete ends here, before the allocation is spent on pretraining:
    # loft_submit_followups has said why in one line (exit 2: a follow-up could never start).
    LOFT_INHERIT_SHAPE=1 loft_submit_followups "$SLURM_JOB_ID" || exit $?
  fi
  loft_stage pretrain "${LOFT_NP:-${SLURM_NTASKS:-1}}" || rc=$?
  exit "$rc"
}

# loft_check_snapshots STEP...: the steps of a snapshot array (LOFT_SNAPSHOTS).  A task for step
# S runs prune,retrain with prune.mask_from=S and writes only its own files: tickets@S_pNN.h5,
# retrain@S_pNN.h5, ckpt/retrain@S_pNN/, imp/tickets@S_pNN_level<k>.h5.  "end" is refused: the
# ticket of the end of pretraining (tickets_pNN.h5, retrain_pNN.h5, ckpt/retrain_pNN/) is the
# main chain's prune and retrain jobs' work, and a task writing them would race with those jobs
# on the same files.  A step listed twice would make two tasks write the same files: refused too.
# Returns 2 (a configuration error) with one line naming the step.
loft_check_snapshots() {
  local s seen=" "
  if [ "$#" = 0 ]; then loft_log "ERROR: LOFT_SNAPSHOTS is empty"; return 2; fi
  for s in "$@"; do
    if [ "$s" = end ]; then
      loft_log "ERROR: LOFT_SNAPSHOTS: 'end' is not a snapshot: the end ticket (tickets_pNN.h5," \
               "retrain_pNN.h5) is made by the chain's prune and retrain jobs (slurm/prune.sh," \
               "slurm/retrain.sh); list only pretraining steps in output.snapshot_weights"
      return 2
    fi
    case "$seen" in
      *" $s "*) loft_log "ERROR: LOFT_SNAPSHOTS: step $s is listed twice (two tasks would write the same files)"
                return 2 ;;
    esac
    seen+="$s "
  done
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

# loft_header SCRIPT OPTION: the value of "#SBATCH --OPTION=value" in slurm/SCRIPT.sh.
loft_header() {
  sed -n "s/^#SBATCH --$2=\([^ ]*\).*/\1/p" "$LOFT_REPO/slurm/$1.sh" | head -n 1
}

# loft_shape_args STAGE [LIKE]: fill array LOFT_SHAPE with the sbatch options for the job of STAGE
# (pretrain, prune, retrain or snapshots).  The allocation of a multi-rank job is derived so that
# it can always be placed (never "--nodes=1 --ntasks=4 --ntasks-per-node=2", which waits forever):
#   nodes          LOFT_NODES, else (LOFT_INHERIT_SHAPE=1, inside a pretraining job) that job's nodes
#   tasks per node LOFT_NTASKS_PER_NODE, else the pretraining job's --ntasks-per-node (if it had one)
#   tasks          nodes x tasks per node when both are known; else (inheriting) the pretraining
#                  job's task count; else LOFT_NP.  LOFT_NP is the number of *ranks* a job starts:
#                  with more ranks than tasks (4 ranks on a 2-core node) they share the task slots
#                  (mpirun --oversubscribe), in the pretraining job and in its follow-ups alike.
#   GPUs per node  LOFT_GPUS_PER_NODE, else the pretraining job's (--gres=gpu:N: one rank per GPU)
#   CPUs per task, memory, partition, account: LOFT_CPUS_PER_TASK, LOFT_MEM, LOFT_<STAGE>_PARTITION
#                  or LOFT_PARTITION, LOFT_ACCOUNT, else the pretraining job's; --overcommit too
# The prune job (one-shot) is --nodes=1 --ntasks=$LOFT_PRUNE_NP (default 1).  With LIKE (another
# stage), STAGE's job gets LIKE's shape: its ranks, nodes, GPUs, CPUs, memory, partition
# (LOFT_<LIKE>_PARTITION), time limit (LOFT_<LIKE>_TIME, else the --time of slurm/LIKE.sh) and
# signal lead (slurm/LIKE.sh); only LOFT_<STAGE>_SBATCH_ARGS stay STAGE's.  (IMP pruning is
# submitted like retraining.)  Then: --output in LOFT_LOG_DIR (a follow-up: else the folder of the
# pretraining job's own log), LOFT_SBATCH_ARGS, LOFT_<STAGE>_SBATCH_ARGS (last: they win).
loft_shape_args() {
  local stage="$1" like="${2:-$1}" up inherit="${LOFT_INHERIT_SHAPE:-0}" v part=() logdir
  up="$(printf '%s' "$like" | tr '[:lower:]' '[:upper:]')"
  local job_nodes="" job_ntasks="" job_tpn="" job_cpt="" job_gpn="" job_part="" job_acct="" job_mem=""
  local job_mem_cpu="" job_overcommit=""
  if [ "$inherit" = 1 ]; then
    job_nodes="${SLURM_JOB_NUM_NODES:-}" job_ntasks="${SLURM_NTASKS:-}"
    job_tpn="${SLURM_NTASKS_PER_NODE:-}" job_cpt="${SLURM_CPUS_PER_TASK:-}"
    job_gpn="${SLURM_GPUS_ON_NODE:-}" job_part="${SLURM_JOB_PARTITION:-}"
    job_acct="${SLURM_JOB_ACCOUNT:-}" job_mem="${SLURM_MEM_PER_NODE:+${SLURM_MEM_PER_NODE}M}"
    job_mem_cpu="${SLURM_MEM_PER_CPU:+${SLURM_MEM_PER_CPU}M}" job_overcommit="${SLURM_OVERCOMMIT:-}"
  fi
  LOFT_SHAPE=()
  local cpt="${LOFT_CPUS_PER_TASK:-$job_cpt}" mem="${LOFT_MEM:-$job_mem}"
  if [ "$like" = prune ]; then
    LOFT_SHAPE+=(--nodes=1 --ntasks="${LOFT_PRUNE_NP:-1}")
  else
    local nodes="${LOFT_NODES:-$job_nodes}" tpn="${LOFT_NTASKS_PER_NODE:-$job_tpn}" ntasks
    local gpn="${LOFT_GPUS_PER_NODE:-$job_gpn}"
    if [ -n "$nodes" ] && [ -n "$tpn" ]; then ntasks=$((nodes * tpn))
    elif [ "$inherit" = 1 ] && [ -n "$job_ntasks" ]; then ntasks="$job_ntasks"
    else ntasks="${LOFT_NP:-}"; fi
    if [ -n "$nodes" ]; then LOFT_SHAPE+=(--nodes="$nodes"); fi
    if [ -n "$ntasks" ]; then LOFT_SHAPE+=(--ntasks="$ntasks"); fi
    if [ -n "$tpn" ]; then LOFT_SHAPE+=(--ntasks-per-node="$tpn"); fi
    if [ -n "$gpn" ] && [ "$gpn" != 0 ]; then LOFT_SHAPE+=(--gres="gpu:$gpn"); fi
  fi
  if [ -n "$cpt" ]; then LOFT_SHAPE+=(--cpus-per-task="$cpt"); fi
  if [ -n "$mem" ]; then LOFT_SHAPE+=(--mem="$mem")
  elif [ -n "$job_mem_cpu" ]; then LOFT_SHAPE+=(--mem-per-cpu="$job_mem_cpu"); fi
  if [ "$job_overcommit" = 1 ]; then LOFT_SHAPE+=(--overcommit); fi
  v="LOFT_${up}_PARTITION"; v="${!v:-${LOFT_PARTITION:-$job_part}}"
  if [ -n "$v" ]; then LOFT_SHAPE+=(--partition="$v"); fi
  v="${LOFT_ACCOUNT:-$job_acct}"
  if [ -n "$v" ]; then LOFT_SHAPE+=(--account="$v"); fi
  v="LOFT_${up}_TIME"
  if [ -n "${!v:-}" ]; then LOFT_SHAPE+=(--time="${!v}")
  elif [ "$like" != "$stage" ]; then
    v="$(loft_header "$like" time)"
    if [ -n "$v" ]; then LOFT_SHAPE+=(--time="$v"); fi
  fi
  if [ "$like" != "$stage" ]; then
    v="$(loft_header "$like" signal)"
    if [ -n "$v" ]; then LOFT_SHAPE+=(--signal="$v"); fi
  fi
  logdir="${LOFT_LOG_DIR:-}"
  if [ -z "$logdir" ] && [ "$inherit" = 1 ]; then logdir="$(loft_job_log_dir)"; fi
  if [ -n "$logdir" ]; then
    if [ "$stage" = snapshots ]; then LOFT_SHAPE+=(--output="$logdir/%x-%A_%a.out")
    else LOFT_SHAPE+=(--output="$logdir/%x-%j.out"); fi
  fi
  loft_split part "${LOFT_SBATCH_ARGS:-}"; LOFT_SHAPE+=("${part[@]}")
  v="LOFT_$(printf '%s' "$stage" | tr '[:lower:]' '[:upper:]')_SBATCH_ARGS"
  loft_split part "${!v:-}"; LOFT_SHAPE+=("${part[@]}")
}

# loft_job_log_dir: the folder of this job's own log (StdOut of scontrol show job), where its
# follow-ups write theirs unless LOFT_LOG_DIR says otherwise.  Nothing outside a job.
loft_job_log_dir() {
  local out
  if [ -z "${SLURM_JOB_ID:-}" ]; then return 0; fi
  out="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=\(.*\)$/\1/p' | head -n 1)"
  case "$out" in /*) dirname "$out" ;; esac
}

# loft_config_value KEY STAGE: print section.key of the config (LOFT_CONFIG with LOFT_OVERRIDES
# and LOFT_<STAGE>_OVERRIDES), read with the package's own config loader (the virtual
# environment's python, else LOFT_PYTHON, else python3; it imports only PyYAML, not torch).
# Fails (status 1, nothing printed) when the config cannot be loaded there.
loft_config_value() {
  local key="$1" stage="$2" py
  py="${LOFT_VENV:-$LOFT_REPO/.venv}/bin/python"
  [ -x "$py" ] || py="${LOFT_PYTHON:-}"
  [ -n "$py" ] || py="$(command -v python3 || true)"
  if [ -z "$py" ]; then return 1; fi
  loft_stage_overrides "$stage"
  PYTHONPATH="$LOFT_REPO${PYTHONPATH:+:$PYTHONPATH}" "$py" -c '
import sys
from loft_hpc.config.load import load_config
sec, key = sys.argv[1].split(".", 1)
print(getattr(getattr(load_config(sys.argv[2], sys.argv[3:]), sec), key))
' "$key" "$LOFT_CONFIG" "${LOFT_STAGE_OVERRIDES[@]}" 2>/dev/null
}

# loft_prune_levels: print prune.levels of the prune job (loft_config_value).  When the config
# cannot be loaded there (no such python, or an invalid config, which the pretraining job
# reports), the last prune.levels=N override wins, else a "levels: N" line in the config's prune:
# section, else 1.
loft_prune_levels() {
  local out="" o
  out="$(loft_config_value prune.levels prune)" || out=""
  case "$out" in ''|*[!0-9]*) out="" ;; esac
  if [ -z "$out" ]; then
    loft_stage_overrides prune
    for o in "${LOFT_STAGE_OVERRIDES[@]}"; do
      case "$o" in prune.levels=*) out="${o#prune.levels=}" ;; esac
    done
    if [ -z "$out" ]; then
      out="$(awk '/^[^ \t#]/ { sec = $1 } sec == "prune:" && $1 == "levels:" { print $2; exit }' \
             "$LOFT_CONFIG" 2>/dev/null)"
    fi
    case "$out" in ''|*[!0-9]*) out=1 ;; esac
    loft_log "could not load $LOFT_CONFIG with ${LOFT_PYTHON:-the virtual environment python}: prune.levels=$out read from the text"
  fi
  printf '%s\n' "$out"
}

# loft_prune_shape: fill LOFT_SHAPE for the prune job.  One-shot pruning (prune.levels = 1) is a
# short single-node job (LOFT_PRUNE_NP ranks, default 1; LOFT_PRUNE_TIME, LOFT_PRUNE_PARTITION).
# IMP (prune.levels > 1) retrains every level but the last, i.e. does the retrain job's work
# levels-1 times: the prune job then gets the retrain job's shape (ranks, nodes, tasks per node,
# GPUs, CPUs, memory, partition, time limit, signal lead; LOFT_PRUNE_NP/_TIME/_PARTITION do not
# apply, LOFT_PRUNE_SBATCH_ARGS still do).
loft_prune_shape() {
  local levels
  levels="$(loft_prune_levels)"
  if [ "$levels" -gt 1 ]; then
    loft_shape_args prune retrain
    loft_log "prune.levels=$levels (IMP retrains every level): the prune job gets the retrain job's shape"
  else
    loft_shape_args prune
  fi
}

# loft_can_start NAME SCRIPT SBATCH_OPTION...: ask SLURM (sbatch --test-only: nothing is
# submitted) whether a job of that shape could ever start on this cluster.  If not, log one line
# naming the job, its options and SLURM's reason, and return 2.  LOFT_CHECK_FOLLOWUPS=0 skips it.
loft_can_start() {
  local name="$1" script="$2" err
  shift 2
  if [ "${LOFT_CHECK_FOLLOWUPS:-1}" = 0 ]; then return 0; fi
  err="$(loft_sbatch_test "$@" "$script" 2>&1 >/dev/null)" && return 0
  err="$(printf '%s\n' "$err" | sed '/^[[:space:]]*$/d' | tail -n 1)"
  loft_log "ERROR: the $name job could never start (sbatch $* $(basename "$script")): ${err:-sbatch --test-only failed}; nothing was submitted. Change the shape (LOFT_NP, LOFT_NODES, LOFT_NTASKS_PER_NODE, LOFT_MEM, LOFT_${name^^}_SBATCH_ARGS ...; slurm/README.md)"
  return 2
}

# loft_sbatch_test ARGS...: sbatch --test-only ARGS (inside a job: without that job's SLURM_*).
loft_sbatch_test() {
  (
    for v in ${!SLURM_@}; do
      case "$v" in SLURM_CONF) ;; *) unset "$v" ;; esac
    done
    sbatch --test-only "$@"
  )
}

# loft_submit_followups AFTER_ID: submit prune (afterok:AFTER_ID) and retrain (afterok:prune),
# both with --kill-on-invalid-dep=yes; sets LOFT_PRUNE_JOB and LOFT_RETRAIN_JOB and prints
# "prune=<id>" / "retrain=<id>" lines on stdout.  Both shapes are first checked with
# loft_can_start: a follow-up that could never start returns 2 with nothing submitted; a failed
# submission returns 1 (a prune job already submitted is cancelled).
loft_submit_followups() {
  local after="$1" prune_shape=()
  loft_prune_shape
  prune_shape=("${LOFT_SHAPE[@]}")
  loft_can_start prune "$LOFT_REPO/slurm/prune.sh" "${prune_shape[@]}" || return 2
  loft_shape_args retrain
  loft_can_start retrain "$LOFT_REPO/slurm/retrain.sh" "${LOFT_SHAPE[@]}" || return 2
  LOFT_PRUNE_JOB="$(loft_sbatch "${prune_shape[@]}" --dependency="afterok:$after" \
      --kill-on-invalid-dep=yes "$LOFT_REPO/slurm/prune.sh")" || {
    loft_log "ERROR: could not submit the prune job (sbatch ${prune_shape[*]} prune.sh)"; return 1; }
  LOFT_RETRAIN_JOB="$(loft_sbatch "${LOFT_SHAPE[@]}" --dependency="afterok:$LOFT_PRUNE_JOB" \
      --kill-on-invalid-dep=yes "$LOFT_REPO/slurm/retrain.sh")" || {
    loft_log "ERROR: could not submit the retrain job (sbatch ${LOFT_SHAPE[*]} retrain.sh); cancelling prune job $LOFT_PRUNE_JOB"
    scancel "$LOFT_PRUNE_JOB" 2>/dev/null || true
    return 1
  }
  loft_log "submitted prune job $LOFT_PRUNE_JOB (afterok:$after: ${prune_shape[*]})" \
           "and retrain job $LOFT_RETRAIN_JOB (afterok:$LOFT_PRUNE_JOB: ${LOFT_SHAPE[*]})"
  printf 'prune=%s\nretrain=%s\n' "$LOFT_PRUNE_JOB" "$LOFT_RETRAIN_JOB"
  if [ -n "${LOFT_OUT:-}" ] && mkdir -p "$LOFT_OUT" 2>/dev/null; then
    printf 'after=%s prune=%s retrain=%s submitted=%s\n' "$after" "$LOFT_PRUNE_JOB" \
        "$LOFT_RETRAIN_JOB" "$(date '+%FT%T')" >> "$LOFT_OUT/slurm_jobs.txt"
  fi
}
