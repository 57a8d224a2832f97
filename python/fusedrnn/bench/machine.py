"""The machine header: what ran the benchmark, so numbers are never separated from their source."""
from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch


def _run(cmd, cwd=None, timeout=10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> Optional[str]:
    """/proc/cpuinfo's text, read once for the header's three fields, or None where there is
    none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.*)$", _cpuinfo() or "", re.M | re.I)
    return m.group(1).strip() if m else platform.processor() or platform.machine() or "unknown"


def cpu_family() -> str:
    """x86 "family F model M" from /proc/cpuinfo, or "" where it has none. A virtual machine's
    model name often says only "AMD EPYC", and the GEMMs' speeds differ by generation (the family:
    25 is Zen 3 and Zen 4, 26 Zen 5, see fusedrnn._input_projection)."""
    text = _cpuinfo() or ""
    family = re.search(r"^cpu family\s*:\s*(\d+)", text, re.M)
    model = re.search(r"^model\s*:\s*(\d+)", text, re.M)
    return f"family {family.group(1)} model {model.group(1)}" if family and model else ""


def cpu_simd() -> str:
    """The widest x86 vector extensions the CPU reports (what the CPU kernels can dispatch to)."""
    text = _cpuinfo()
    if text is None:
        return "unknown"
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    found = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return " ".join(found) or "none of avx2/avx512"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def fusedrnn_version() -> str:
    """From the installed metadata, else the checkout's pyproject.toml, else 'unknown'."""
    try:
        from importlib.metadata import version
        return version("fusedrnn")
    except Exception:
        pass
    for parent in package_dir().parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
            if m and 'name = "fusedrnn"' in pyproject.read_text():
                return m.group(1)
            break
    return "unknown"


def git_commit() -> Dict[str, object]:
    """$FUSEDRNN_BENCH_COMMIT when set (bench/gpu_check.sh passes the commit it built: a copied
    checkout's .git may lag), else the commit of the checkout the package was imported from (its
    files tracked there), else the commit the installed package was built from (_build_info.py,
    written by CMake), else 'unknown'. A package installed into a checkout's .venv is not that
    checkout: its HEAD may be newer."""
    if os.environ.get("FUSEDRNN_BENCH_COMMIT"):
        return {"commit": os.environ["FUSEDRNN_BENCH_COMMIT"], "dirty": None}
    where = str(package_dir())
    if _run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=where) is not None:
        commit = _run(["git", "rev-parse", "HEAD"], cwd=where)
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where)
        if commit:
            return {"commit": commit, "dirty": bool(status) if status is not None else None}
    try:
        from fusedrnn import _build_info
        return {"commit": _build_info.COMMIT, "dirty": _build_info.DIRTY}
    except ImportError:
        return {"commit": "unknown", "dirty": None}


def gpu_info(device_index: int = 0) -> Dict[str, object]:
    # Every key the JSON documents is present, null where there is no GPU.
    info: Dict[str, object] = {"gpu": None, "driver": None, "cuda_runtime": torch.version.cuda,
                               "cudnn": None}
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(device_index)
    info.update(
        gpu=props.name,
        gpu_count=torch.cuda.device_count(),
        compute_capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        cuda_runtime=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
        driver=None,
    )
    smi = _run(["nvidia-smi", f"--id={device_index}", "--query-gpu=driver_version,clocks.max.sm",
                "--format=csv,noheader,nounits"])
    if smi:
        fields = [f.strip() for f in smi.splitlines()[0].split(",")]
        info["driver"] = fields[0]
        if len(fields) > 1 and fields[1].isdigit():
            info["sm_clock_max_mhz"] = int(fields[1])
    return info


def native_backends() -> Dict[str, object]:
    """Which fusedrnn native modules import here, and which build of the CPU kernel runs
    (generic, avx2, avx512, avx512bf16 or amx: picked by cpuid, lowered by FUSEDRNN_CPU_ISA).
    Never raises: the header must always print."""
    try:
        from fusedrnn import _backend
    except Exception as exc:  # the package may be half-built while developing
        return {"fusedrnn_backends": f"unavailable ({type(exc).__name__}: {exc})"}
    info: Dict[str, object] = {"fusedrnn_backends": ",".join(
        name for name, ok in (("cpu", _backend.HAS_CPU), ("cuda", _backend.HAS_CUDA), ("emu", _backend.HAS_EMU)) if ok)
        or "none built"}
    if _backend.HAS_CPU:
        try:
            from fusedrnn import _cpu
            info["fusedrnn_cpu_isa"] = _cpu.isa()
        except Exception as exc:  # FUSEDRNN_CPU_ISA set to a name the kernel does not know
            info["fusedrnn_cpu_isa"] = f"unknown ({exc})"
    return info


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning(info: Dict[str, object]) -> Optional[str]:
    """Other processes on the cores make CPU timings unreliable (OpenMP teams suffer the most)."""
    load, cores = info.get("load_avg_1m"), info.get("cpu_cores") or 1
    if info.get("device") == "cpu" and load is not None and load > 0.75 * float(cores):
        return (f"the 1-minute load average was {load} on {cores} cores when the run began: other "
                f"processes compete for the CPU, so times and ratios are unreliable")
    return None


def collect(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device,
        "cpu": cpu_model(),
        "cpu_family": cpu_family(),
        "cpu_simd": cpu_simd(),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "fusedrnn": fusedrnn_version(),
    }
    info.update(git_commit())
    info.update(native_backends())
    # FUSEDRNN_BACKEND=emu times the CPU emulator of the CUDA kernels; the others pick kernels
    # and GEMMs (FUSEDRNN_CPU_ISA, FUSEDRNN_CPU_GEMM, ...).
    info["fusedrnn_env"] = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                    if k.startswith("FUSEDRNN_") and k != "FUSEDRNN_BENCH_COMMIT")
    info.update(gpu_info())
    return info


def header_lines(info: Dict[str, object]) -> list:
    commit = str(info.get("commit", "unknown"))
    short = commit[:12] + ("+dirty" if info.get("dirty") else "")
    family = info.get("cpu_family")
    lines = [
        f"CPU    {info['cpu']}{f' ({family})' if family else ''} | {info['cpu_cores']} core{'' if info['cpu_cores'] == 1 else 's'} usable | torch threads {info['torch_threads']}"
        f" | {info['cpu_simd']} | load {info.get('load_avg_1m')}",
        f"torch  {info['torch']} (mkldnn {'on' if info['mkldnn'] else 'off'}) | python {info['python']}",
        f"fusedrnn {info['fusedrnn']} commit {short} | native: {info.get('fusedrnn_backends')}"
        + (f" | CPU kernel {info['fusedrnn_cpu_isa']}" if info.get("fusedrnn_cpu_isa") else ""),
    ]
    if info.get("fusedrnn_env"):  # overrides change what is timed: say so where the numbers are
        emulated = "FUSEDRNN_BACKEND=emu" in str(info["fusedrnn_env"]).split()
        lines.append(f"env    {info['fusedrnn_env']}" + (
            " (fusedrnn rows time the CPU emulator of the CUDA kernels, not a real kernel)"
            if emulated else ""))
    if info.get("gpu"):
        lines.append(
            f"GPU    {info['gpu']} (sm_{str(info['compute_capability']).replace('.', '')}, "
            f"{info['sm_count']} SMs, {info['gpu_memory_gib']} GiB) | driver {info.get('driver') or 'unknown'}"
            f" | CUDA {info['cuda_runtime']} | cuDNN {info['cudnn']} (tf32 {'on' if info['cudnn_allow_tf32'] else 'off'})")
    else:
        lines.append("GPU    none")
    lines.append(f"date   {info['date_utc']} UTC | device {info['device']}")
    return lines
