"""The child-process measurement that compare and the benchmarks share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lmtune.measure import PEAK_RSS_FILE_ENV, peak_rss_bytes, run_child

SRC = str(Path(__file__).resolve().parents[1] / "src")
_REPORT = "import json, sys; from lmtune.measure import peak_rss_bytes; print(json.dumps(peak_rss_bytes()))"


def _child_peak(code: str) -> int:
    env = os.environ | {"PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", f"{code}\n{_REPORT}"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_a_childs_peak_is_its_own_not_the_parents():
    held = bytearray(300 * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # touched: resident in this (the parent) process
    assert peak_rss_bytes() > 300 * 2**20
    idle = _child_peak("pass")
    busy = _child_peak("b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])")
    assert idle < 200 * 2**20  # a bare interpreter, whatever this process holds
    assert busy - idle > 190 * 2**20
    del held


def test_run_child_returns_the_exit_code():
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3


def test_ctrl_c_waits_for_the_child_to_finish_then_raises(tmp_path):
    done = tmp_path / "done"
    # On SIGINT the child takes a moment to "save" (write a file), then exits 130.
    child = (f"import signal, time, pathlib\n"
             f"def stop(*_):\n    time.sleep(0.5); pathlib.Path({str(done)!r}).write_text('saved'); "
             f"raise SystemExit(130)\n"
             f"signal.signal(signal.SIGINT, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    parent = (f"import sys; from lmtune.measure import run_child\n"
              f"try:\n    run_child([sys.executable, '-c', {child!r}])\n"
              f"except KeyboardInterrupt:\n    print('interrupted', flush=True); sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": SRC}, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out.strip() == "interrupted"
    assert done.read_text() == "saved"  # the child was not killed before it finished


def test_an_entry_point_reports_its_peak_to_the_file_its_parent_names(tmp_path):
    held = bytearray(800 * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # the parent's peak must not leak into the report
    report = tmp_path / "peak"
    code = ("from lmtune.runtime import configure; configure()\n"
            "b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096])")
    env = os.environ | {"PYTHONPATH": SRC, PEAK_RSS_FILE_ENV: str(report)}
    assert run_child([sys.executable, "-c", code], env=env).returncode == 0
    assert 100 * 2**20 < int(report.read_text()) < 800 * 2**20
    del held
