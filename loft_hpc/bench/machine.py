"""What the benchmark ran on: one dict, printed at the top of the results."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def mpi_version() -> str | None:
    exe = shutil.which("mpirun")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def describe() -> dict:
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cores": os.cpu_count(),
            "cpu": cpu_model(), "memory_bytes": mem, "load_average": load_average(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "horovod": _version("horovod"),
            "mpi": mpi_version(), "os": platform.platform()}


def one_line(m: dict) -> str:
    la = m.get("load_average")
    mem = m.get("memory_bytes")
    return (f"{m['date']}, {m['cores']} cores ({m['cpu']})"
            + (f", {mem / 2**30:.0f} GiB" if mem else "") + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + (f", load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}" if la else "")
            + f"; python {m['python']}, torch {m['torch']}, horovod {m['horovod']}, {m['mpi'] or 'no mpirun'}")
