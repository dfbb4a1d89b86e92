#!/usr/bin/env bash
# One idempotent set-up step used by `make run` and `make test` (and so by .ci/run):
#   1. Debian packages (only the missing ones; skipped when not root or without apt-get),
#   2. the virtual environment .venv with the pinned versions of constraints.txt,
#   3. Horovod built against the installed torch with PyTorch + MPI (rebuilt only when torch changes),
#   4. the package itself, installed editable.
# A second run changes nothing and takes seconds.
#
# Environment knobs (for clusters):
#   LOFT_VENV                  venv folder (default: <repo>/.venv)
#   LOFT_TORCH_VERSION         override torch (default from constraints.txt)
#   LOFT_TORCHVISION_VERSION   override torchvision (must match torch)
#   LOFT_SKIP_APT=1            never call apt-get (use the cluster's MPI/CUDA modules instead)
#   LOFT_WITH_SLURM=0          do not install slurm-wlm/munge (they are only needed by the tests)
#   HOROVOD_GPU_OPERATIONS=NCCL, HOROVOD_NCCL_HOME, CUDA_HOME ... are passed through to the build.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOFT_VENV:-$repo/.venv}"
constraints="$repo/constraints.txt"
log() { printf '[setup] %s\n' "$*" >&2; }

pin() { sed -n "s/^$1==//p" "$constraints"; }
torch_ver="${LOFT_TORCH_VERSION:-$(pin torch)}"
tv_ver="${LOFT_TORCHVISION_VERSION:-$(pin torchvision)}"
hvd_ver="$(pin horovod)"

# ---------------------------------------------------------------- 1. Debian packages
apt_pkgs=(openmpi-bin libopenmpi-dev cmake hdf5-tools)
[ "${LOFT_WITH_SLURM:-1}" = 1 ] && apt_pkgs+=(slurm-wlm munge)
if [ "${LOFT_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
else
  log "skipping apt (LOFT_SKIP_APT=${LOFT_SKIP_APT:-0}, uid=$(id -u)); expecting mpicc/cmake on PATH"
fi
command -v mpicc >/dev/null || { echo "setup: mpicc not found: install Open MPI (apt: openmpi-bin libopenmpi-dev) or load your cluster's MPI module" >&2; exit 1; }

# ---------------------------------------------------------------- 2. venv + pinned packages
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# (the local package mirrors make pip warn once per package about empty index folders: drop those lines)
pipi() { "$py" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Constraints with the torch override applied (a pin may not contradict an explicit request).
cfile="$venv/.loft-constraints.txt"
grep -v -E '^(torch|torchvision|horovod)==' "$constraints" > "$cfile"
echo "torch==$torch_ver" >> "$cfile"; echo "torchvision==$tv_ver" >> "$cfile"

stamp="$venv/.loft-deps.sha"
want="$(cat "$cfile" "$repo/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned packages (torch $torch_ver, torchvision $tv_ver)"
  pipi -c "$cfile" pip setuptools wheel
  pipi -c "$cfile" "torch==$torch_ver" "torchvision==$tv_ver" numpy h5py pyyaml mpi4py tqdm \
      matplotlib scikit-learn pytest pytest-timeout packaging cloudpickle psutil cffi
  echo "$want" > "$stamp"
fi

# ---------------------------------------------------------------- 3. horovod (rebuilt when torch changes)
hstamp="$venv/.loft-horovod.sha"
hwant="$("$py" -c 'import torch; print(torch.__version__)')-$hvd_ver-${HOROVOD_GPU_OPERATIONS:-cpu}"
if [ "$(cat "$hstamp" 2>/dev/null)" != "$hwant" ] || ! "$py" -c 'import horovod.torch' 2>/dev/null; then
  log "building horovod $hvd_ver against torch $("$py" -c 'import torch; print(torch.__version__)') (a few minutes)"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_CPU_OPERATIONS="${HOROVOD_CPU_OPERATIONS:-MPI}"
  export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
  export LOFT_REAL_CXX="${CXX:-g++}" CXX="$repo/scripts/cxx_std_wrapper.sh"
  # Newer GCC no longer pulls <string>/<cstdint> in through other headers, which Horovod 0.28.1's
  # sources rely on ("'string' in namespace 'std' does not name a type" in group_table.h, seen
  # building with NCCL on a GPU machine with Open MPI 4.1.6 and Python 3.12): include them up
  # front (that build then succeeded; harmless with this machine's compiler).
  export CXXFLAGS="-include string -include cstdint ${CXXFLAGS:-}"
  # A CUDA build of torch makes horovod's CMake look for the CUDA toolkit.
  if "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
    cuda="${CUDA_HOME:-}"
    if [ -z "$cuda" ]; then
      for c in /usr/local/cuda /usr/local/cuda-*; do [ -x "$c/bin/nvcc" ] && { cuda="$c"; break; }; done
    fi
    [ -n "$cuda" ] || { echo "setup: torch is a CUDA build but no CUDA toolkit (nvcc) was found: set CUDA_HOME" >&2; exit 1; }
    export CUDA_HOME="$cuda" CUDAToolkit_ROOT="$cuda" CUDACXX="$cuda/bin/nvcc"
  fi
  "$py" -m pip uninstall -y -q horovod 2>/dev/null || true
  pipi --no-build-isolation --no-cache-dir -c "$constraints" "horovod==$hvd_ver" >&2
  echo "$hwant" > "$hstamp"
  "$venv/bin/horovodrun" --check-build >&2
fi

# ---------------------------------------------------------------- 4. the package (editable)
# "Installed?" is asked from another folder (/): run from the repository, `import loft_hpc` would
# always succeed from the current folder and the install would never happen.  Installed means:
# the distribution's metadata is there, it is an editable install of *this* repository, its
# console script loft-run exists, and loft_hpc imports from here; and the install is redone when
# setup.cfg or pyproject.toml (entry points, package data) changed since it was made.
istamp="$venv/.loft-install.sha"
iwant="$(cat "$repo/setup.cfg" "$repo/pyproject.toml" 2>/dev/null | sha256sum | cut -d' ' -f1)-$repo"
installed() {
  [ "$(cat "$istamp" 2>/dev/null)" = "$iwant" ] && [ -x "$venv/bin/loft-run" ] &&
  (cd / && "$py" - "$repo" <<'PY'
import json, os, sys
from importlib import metadata
repo = os.path.realpath(sys.argv[1])
try:
    url = json.loads(metadata.distribution("loft_hpc").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    sys.exit(1)
if not url.get("dir_info", {}).get("editable") or os.path.realpath(url.get("url", "").removeprefix("file://")) != repo:
    sys.exit(1)
import loft_hpc
sys.exit(0 if os.path.realpath(loft_hpc.__file__).startswith(repo + os.sep) else 1)
PY
  ) >/dev/null 2>&1
}
if ! installed; then
  log "installing loft_hpc (editable) from $repo"
  pipi --no-build-isolation --no-deps -e "$repo"
  echo "$iwant" > "$istamp"
  installed || { echo "setup: loft_hpc is still not importable from outside $repo after pip install -e" >&2; exit 1; }
fi
log "ready: $venv"
