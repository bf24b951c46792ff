"""The memory allocator a training process runs on: mimalloc where it is installed, else the C
library's.

Why: on the CPU, tensors come from malloc. glibc's malloc serves the many mid-sized activation
buffers of a training step from its heap and keeps every page it has touched there; as long-lived
saved activations and short-lived temporaries interleave, the heap's holes stay resident, and the
process peaks far above what it holds at any moment (about a third higher than under mimalloc on
the identity LoRA job of benchmarks/peers.py, at about the same step time). Making glibc hand
those buffers to mmap instead frees them at once but pays a page fault per 4 KiB on every use,
a third more step time on that job.

An allocator has to be chosen before the process starts (LD_PRELOAD), so `lmtune train` starts
itself again with mimalloc preloaded, as torch's own CPU launcher (torch.backends.xeon.run_cpu)
does with jemalloc or tcmalloc. `allocator: system` keeps the C library's.

mimalloc's own settings (its environment variables) are its defaults but one: its arenas commit
memory as pages are used instead of all at once (MIMALLOC_ARENA_EAGER_COMMIT=0), which also lets it
decommit the pages it frees. On that job this lowered the peak by 0.04-0.06 GiB at the same step
time. A value the user set is kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PRELOAD = "LD_PRELOAD"
LIBRARY = "libmimalloc.so"
MIMALLOC_SETTINGS = {"MIMALLOC_ARENA_EAGER_COMMIT": "0"}


def mimalloc_library() -> Path | None:
    """The shared mimalloc library the cmeel-mimalloc wheel installs, if this platform has it."""
    if not sys.platform.startswith("linux"):
        return None
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("cmeel-mimalloc")
    except PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name.startswith(LIBRARY + "."):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def active_allocator() -> str:
    """'mimalloc' when this process runs on it, else 'system' (read from its own memory map)."""
    maps = Path("/proc/self/maps")
    if maps.is_file() and LIBRARY in maps.read_text():
        return "mimalloc"
    return "system"


def restart_with(allocator: str) -> None:
    """Start this very command again with `allocator` preloaded, unless it runs on it already, the
    user asked for the system's, or the library is missing here (then the run goes on as it is).
    exec keeps the process id, so a launcher that started it (torchrun, a shell, the web UI)
    still waits on the same process."""
    if allocator != "mimalloc" or active_allocator() == "mimalloc" or _is_rank():
        return
    library = mimalloc_library()
    if library is None:
        return
    preload = " ".join(filter(None, [str(library), os.environ.get(PRELOAD, "")]))
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own command line, its flags (-u, -X, -W) and script or -m module included.
    os.execve(sys.executable, sys.orig_argv, MIMALLOC_SETTINGS | os.environ | {PRELOAD: preload})


def _is_rank() -> bool:
    """A rank of a multi-process job keeps the C library's allocator: under mimalloc, a gloo rank
    was seen to abort at exit ("terminate called without an active exception") after a run that
    succeeded, on a loaded machine, which it never did on glibc's."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def forget_preload() -> None:
    """Take mimalloc out of LD_PRELOAD once it is loaded: the processes this one starts (compilers,
    other tools) choose for themselves; a `lmtune train` among them restarts itself as this did."""
    entries = [e for e in os.environ.get(PRELOAD, "").split() if LIBRARY not in Path(e).name]
    if entries:
        os.environ[PRELOAD] = " ".join(entries)
    else:
        os.environ.pop(PRELOAD, None)
