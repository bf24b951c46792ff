"""LLaMA-Factory's own example configs through lmtune, as a user who brings them would (issue #15).

Every YAML under a LLaMA-Factory checkout's examples/ (not examples/v1, the next version's format,
nor the accelerate/deepspeed folders, which hold engine settings, not runs), run from that
checkout's root so its data/ folder and relative paths resolve, with the model swapped for a local
one (and an adapter path for a LoRA adapter of that model): `lmtune plan` for training configs,
`lmtune chat` for examples/inference, `lmtune export` for examples/merge_lora, `lmtune predict` for
a config that predicts without training. Each ends in one of:
runs; refused (an lmtune error naming the key or feature and why); unknown key; traceback. The goal
is no unknown key and no traceback, and every text-only config this machine can run, running.

    python benchmarks/lf_examples.py --llamafactory PATH   # PATH: a LLaMA-Factory checkout
    python benchmarks/lf_examples.py --smoke --llamafactory PATH   # the first 4 configs only

LLaMA-Factory is not shipped here (nor copied in): the checkout is the user's. The commit read is
recorded in the JSON.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import yaml

from _harness import Bench, lora_adapters, source_line, table, tiny_model

SKIPPED_FOLDERS = ("examples/v1/", "examples/accelerate/", "examples/deepspeed/")


def configs(root: Path) -> list[Path]:
    found = sorted(root.glob("examples/**/*.yaml"))
    return [p for p in found if not str(p.relative_to(root)).startswith(SKIPPED_FOLDERS)]


def command_for(relative: str, config: dict) -> str:
    if relative.startswith("examples/inference/"):
        return "chat"
    if relative.startswith("examples/merge_lora/"):
        return "export"
    if config.get("do_predict") and not config.get("do_train"):
        return "predict"
    return "plan"


def localised(config: dict, model: str, adapter: str, scratch: Path) -> dict:
    """The config with its model and adapter swapped for local ones and its outputs in scratch."""
    config = dict(config)
    config["model_name_or_path"] = model
    if config.get("adapter_name_or_path"):
        config["adapter_name_or_path"] = adapter
    for key in ("output_dir", "export_dir"):
        if key in config:
            config[key] = str(scratch / key)
    return config


def outcome(argv: list[str]) -> tuple[str, str]:
    """(kind, what lmtune said) for one command run in this process."""
    from lmtune.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Exception as exc:  # noqa: BLE001 - a traceback is what this check looks for
        return "traceback", "".join(traceback.format_exception_only(exc)).strip()
    text = err.getvalue()
    # The error and what follows it (a list of keys, the fix), as one line.
    said = " ".join(text[text.index("error: ") + len("error: "):].split()) if "error: " in text else ""
    if code == 0:
        return "runs", ""
    if "unknown key" in said:
        return "unknown key", said
    if said:
        return "refused", said
    return "traceback", text.strip().splitlines()[-1] if text.strip() else f"exit {code}"


def measure(bench: Bench, root: Path) -> dict:
    model = tiny_model(bench.scratch / "tiny-model")
    adapter = lora_adapters(model, 1, bench.scratch / "adapters")[0]
    found = configs(root)[: 4 if bench.smoke else None]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    rows = []
    cwd = os.getcwd()
    os.chdir(root)  # LLaMA-Factory's examples name data/ and examples/... relative to its root
    try:
        for path in found:
            relative = str(path.relative_to(root))
            scratch = bench.scratch / "runs" / relative.replace("/", "_")
            scratch.mkdir(parents=True, exist_ok=True)
            raw = yaml.safe_load(path.read_text())
            if "model_name_or_path" not in raw:  # e.g. a new_special_tokens_config file
                print(f"{'skipped':12} {relative}: not a run config (no model_name_or_path)")
                continue
            config = localised(raw, model, adapter, scratch)
            local = scratch / "config.yaml"
            local.write_text(yaml.safe_dump(config))
            command = command_for(relative, config)
            argv = [command, str(local)] + (["--prompt", "Say hi."] if command == "chat" else [])
            kind, said = outcome(argv)
            # The table names the file already; elsewhere, the user's file, not this run's copy.
            said = said.removeprefix(f"{local}: ").replace(str(local), relative)
            rows.append({"config": relative, "command": command, "outcome": kind, "said": said})
            print(f"{kind:12} {relative}: {said[:150]}", flush=True)
    finally:
        os.chdir(cwd)
    counts = Counter(r["outcome"] for r in rows)
    return {"llamafactory_commit": commit, "configs": len(rows),
            "runs": counts["runs"], "refused": counts["refused"],
            "unknown_key": counts["unknown key"], "traceback": counts["traceback"], "rows": rows}


def render(data: dict) -> str:
    # What lmtune said goes in the first cell, which the provenance test does not read as numbers.
    rows = [[f"`{r['config']}` ({r['command']})" + (
        f": {r['said'][:160]}".replace("|", "\\|") if r["said"] else ""), r["outcome"]]
            for r in data["rows"]]
    return (f"{data['configs']} configs (the LLaMA-Factory commit is in the JSON): {data['runs']} "
            f"run, {data['refused']} refused by name, {data['unknown_key']} stopped at an unknown "
            f"key, {data['traceback']} ended in a traceback.\n\n"
            + table(["config (command): what lmtune said", "outcome"], "ll", rows)
            + "\n\n" + source_line("lf_examples") + "\n")


def main() -> None:
    bench = Bench("lf_examples", __doc__, configure=lambda parser: parser.add_argument(
        "--llamafactory", type=Path, help="a LLaMA-Factory checkout (its root folder)"))
    if not bench.args.render_only:
        if bench.args.llamafactory is None:
            sys.exit("--llamafactory PATH is needed: a checkout of LLaMA-Factory.")
        bench.write_json(measure(bench, bench.args.llamafactory.resolve()))
    bench.rewrite("BENCHMARKS.md", "lf_examples", render(bench.read_json()))


if __name__ == "__main__":
    main()
