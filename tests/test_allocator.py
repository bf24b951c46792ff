"""`lmtune train` runs on mimalloc: the command restarts itself (exec: the same process, the same
command line) with the library preloaded and says in all_results.json which allocator ran;
`allocator: system` keeps the C library's. tests/test_interrupt.py signals such a restarted process
and sees it checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmtune import allocator
from tests.conftest import ROOT, write_yaml

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="mimalloc is preloaded on Linux only")


def test_the_library_ships_with_lmtune():
    library = allocator.mimalloc_library()
    assert library is not None and library.is_file() and "libmimalloc.so" in library.name


def _train(tmp_path, train_config, **extra) -> tuple[dict, str]:
    config = write_yaml(tmp_path / "run.yaml", train_config | {"max_steps": 2} | extra)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {
        "PYTHONPATH": str(ROOT / "src")}
    # The command prints its process id as it exits: exec keeps the one Popen started.
    probe = ("import atexit, os, sys; atexit.register(lambda: print('pid', os.getpid())); "
             "from lmtune.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", probe, "train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("pid ") == 1 and f"pid {proc.pid}" in out
    return json.loads((tmp_path / "out" / "all_results.json").read_text()), out


def test_train_restarts_itself_on_mimalloc(tmp_path, train_config):
    results, out = _train(tmp_path, train_config)
    assert results["allocator"] == "mimalloc"
    assert out.count("model saved in") == 1  # one run, however many starts


def test_allocator_system_keeps_the_c_library(tmp_path, train_config):
    results, _ = _train(tmp_path, train_config, allocator="system")
    assert results["allocator"] == "system"


def test_the_preload_is_not_passed_on(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/x/libother.so /lib/libmimalloc.so.3")
    allocator.forget_preload()
    assert os.environ["LD_PRELOAD"] == "/opt/x/libother.so"
    monkeypatch.setenv("LD_PRELOAD", "/lib/libmimalloc.so.3")
    allocator.forget_preload()
    assert "LD_PRELOAD" not in os.environ


def test_the_restart_commits_arena_memory_on_use_unless_the_user_says(monkeypatch):
    started = []
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.setattr(allocator.os, "execve", lambda path, argv, env: started.append(env))
    monkeypatch.delenv("MIMALLOC_ARENA_EAGER_COMMIT", raising=False)
    allocator.restart_with("mimalloc")
    monkeypatch.setenv("MIMALLOC_ARENA_EAGER_COMMIT", "1")
    allocator.restart_with("mimalloc")
    assert [env["MIMALLOC_ARENA_EAGER_COMMIT"] for env in started] == ["0", "1"]
    assert all("libmimalloc.so" in env["LD_PRELOAD"] for env in started)


def test_a_rank_of_a_multi_process_job_keeps_the_c_library(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("a rank restarted"))
    allocator.restart_with("mimalloc")
