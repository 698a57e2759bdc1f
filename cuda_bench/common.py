"""What every benchmark shares: machine description, timing, copy bandwidth, output files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_bytes(level: int = 3) -> int | None:
    """Size of the CPU's cache at `level` (the LLC by default), from sysfs."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = None
    for idx in sorted(base.glob("index*")):
        try:
            if int((idx / "level").read_text()) != level:
                continue
            txt = (idx / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
        val = int(txt.rstrip("KMG")) * mult
        best = max(best or 0, val)
    return best


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else cxx
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified tree)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "hostname_platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "llc_bytes": _cache_bytes(3) or _cache_bytes(2),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cxx": _compiler(),
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": _cpu_model(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, device_memory_bytes=p.total_memory,
                    device_l2_bytes=getattr(p, "L2_cache_size", None),
                    device_sm_count=p.multi_processor_count)
    return info


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_cpu_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / _TICK


class Window:
    """CPU time other processes took from creation until others_frac() is called:
    (all cores' busy time − this process's CPU time) / (wall time × cores), clamped to [0, 1].
    0: the machine was ours; 0.5: others used half of it. /proc/stat counts in 10 ms ticks, so
    read it over a window of a second or more, not around one short call."""

    def __init__(self):
        self.b0, self.c0, self.t0 = _busy_cpu_s(), time.process_time(), time.perf_counter()

    def others_frac(self) -> float | None:
        b1, c1, t1 = _busy_cpu_s(), time.process_time(), time.perf_counter()
        if self.b0 is None or b1 is None or t1 <= self.t0:
            return None
        frac = ((b1 - self.b0) - (c1 - self.c0)) / ((t1 - self.t0) * (os.cpu_count() or 1))
        return min(1.0, max(0.0, frac))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call: wall clock on CPU, CUDA events on the current stream on CUDA."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "n": len(s), "samples_s": s}


def others_busy(window_s: float = 1.0) -> float | None:
    """Fraction of all CPU cores busy during a `window_s` sleep of this process, from /proc/stat:
    what other processes are using right now (None where /proc/stat is missing)."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle
    try:
        t0, i0 = read()
        time.sleep(window_s)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(max_busy: float | None, max_wait_s: float = 600.0) -> float | None:
    """Waits until other processes use less than `max_busy` of the CPU (sampled over 2 s), or
    max_wait_s passes; returns the last busy fraction seen. A crude guard against bursts of
    other work on a shared machine; `Window` in the results shows what got through."""
    if not max_busy:
        return others_busy(0.2)  # just a note of the background load
    busy = others_busy(2.0)
    if busy is None:
        return busy
    t_end = time.monotonic() + max_wait_s
    while busy > max_busy and time.monotonic() < t_end:
        busy = others_busy(2.0)
    return busy


# ----------------------------------------------------------------------------- copy bandwidth
_COPY_BUFFERS: dict = {}


def free_copy_buffers() -> None:
    _COPY_BUFFERS.clear()


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Read+write GB/s of dst.copy_(src) on a buffer well beyond the last-level cache (≥ 4× it),
    using all of torch's threads on CPU. Returns the median, min and the buffer size."""
    if nbytes is None:
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
            nbytes = max(8 * l2, 1 << 30)
        else:
            llc = _cache_bytes(3) or _cache_bytes(2) or (32 << 20)
            nbytes = max(8 * llc, 256 << 20)
    n = nbytes // 4
    key = (str(device), n)
    if key not in _COPY_BUFFERS:  # kept for the next measurement (one run measures many times)
        _COPY_BUFFERS.clear()
        src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
        _COPY_BUFFERS[key] = (src, torch.empty_like(src))
    src, dst = _COPY_BUFFERS[key]
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    window = Window()
    times = [time_once(lambda: dst.copy_(src), device) for _ in range(repeats)]
    st = summarize(times)
    moved = 2 * n * 4
    return {"buffer_bytes": n * 4, "bytes_moved": moved, "repeats": repeats,
            "gbps_median": moved / st["median_s"] / 1e9, "gbps_best": moved / st["min_s"] / 1e9,
            "times_s": st["samples_s"], "others_cpu_frac": window.others_frac() if device.type == "cpu" else None}


# ----------------------------------------------------------------------------- output
def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
