"""Measure a piece of work in a process of its own: wall time and peak resident memory that belong to
it alone, not to the caller's loaded libraries and earlier work. `lmtune compare` and the
benchmarks run each variant this way, one after another: the parent calls `run_child`, the child
reports `peak_rss_bytes()` when its work is done.
"""

from __future__ import annotations

import atexit
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux, getrusage's ru_maxrss keeps the parent's peak across fork and exec, so a child
    started by a process holding 400 MB reports at least 400 MB; the memory map's own high-water
    mark (VmHWM) starts afresh at exec and is the child's alone."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


# A parent that measures a child from outside names a file here; the child writes its own peak
# there as it exits (wait4's figure would carry the parent's peak, see above).
PEAK_RSS_FILE_ENV = "LMTUNE_PEAK_RSS_FILE"


def report_peak_rss_at_exit() -> None:
    """If the parent asked for it (PEAK_RSS_FILE_ENV), write this process's peak RSS in bytes to
    that file when the process exits."""
    target = os.environ.get(PEAK_RSS_FILE_ENV)
    if target:
        atexit.register(lambda: Path(target).write_text(str(peak_rss_bytes())))


def device_name() -> str:
    """The GPU's name, else the CPU and the threads torch uses: what a measurement ran on."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


@dataclass
class ChildRun:
    returncode: int  # negative: killed by that signal
    wall_s: float


def run_child(args: list[str], **popen_kwargs) -> ChildRun:
    """Run `args` to its end. Ctrl-C reaches the child too (same process group); the child is left
    to stop on its own terms (a training run saves a checkpoint first), then KeyboardInterrupt is
    raised here."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, **popen_kwargs)
    interrupted = False
    while proc.returncode is None:
        try:
            proc.wait()
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
    return ChildRun(proc.returncode, round(time.perf_counter() - start, 2))
