#!/usr/bin/env bash
# mpirun with what this kind of machine needs: --allow-run-as-root when root, --oversubscribe
# when more ranks than cores, one torch thread per rank when oversubscribed, and Horovod's stall
# check turned into an error. Usage: scripts/mpirun.sh -np 4 python -m loft_hpc.run ...
set -euo pipefail
np=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[i]}" = "-np" ] || [ "${args[i]}" = "-n" ] && np="${args[i+1]}"
done
extra=(--bind-to none)
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
cores=$(nproc)
if [ "$np" -gt "$cores" ]; then
  extra+=(--oversubscribe)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# (SLURM jobs get the same check from slurm/common.sh, loft_stall_check: 60 s / 600 s there.)
export HOROVOD_STALL_CHECK_TIME_SECONDS="${HOROVOD_STALL_CHECK_TIME_SECONDS:-60}"
export HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="${HOROVOD_STALL_SHUTDOWN_TIME_SECONDS:-120}"
env_args=(-x HOROVOD_STALL_CHECK_TIME_SECONDS -x HOROVOD_STALL_SHUTDOWN_TIME_SECONDS -x PATH)
[ -n "${OMP_NUM_THREADS:-}" ] && env_args+=(-x OMP_NUM_THREADS)  # (-x of an unset variable: a warning line)
[ -n "${PYTHONPATH:-}" ] && env_args+=(-x PYTHONPATH)
[ -n "${LOFT_FAULT_INJECT:-}" ] && env_args+=(-x LOFT_FAULT_INJECT)
# --quiet: no "Primary job terminated normally, but 1 process returned a non-zero exit code"
# banner on a clean non-zero exit (2 bad input, 3 checkpointed for requeue): the program has
# already said what happened in one line. mpirun then says nothing about a rank that was
# killed, so this script does (exit 128+N).
# mpirun runs as a child (to report a killed rank afterwards), so the stop signals this script
# gets (SIGUSR1/SIGTERM from SLURM, scancel or a user) are forwarded to it: mpirun passes them to
# every rank, which checkpoint and exit 3. (wait returns early when a trapped signal arrives,
# hence the loop.)
mpirun --quiet "${extra[@]}" "${env_args[@]}" "$@" &
child=$!
forward() { kill -s "$1" "$child" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
wait "$child" && rc=0 || rc=$?  # bash keeps the ended child's status
if [ "$rc" -gt 128 ]; then
  echo "loft_hpc: error: a rank of the job ended on signal $((rc - 128)) (mpirun exit $rc): killed (out of memory, scancel, node failure?); the other ranks were stopped" >&2
fi
exit "$rc"
