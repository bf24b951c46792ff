"""What every benchmark here shares: a child process measured from outside, where results go, and
the document sections a benchmark rewrites from its own JSON.

Each measured thing runs in a child process of its own, one after another (two torch processes on
two cores slow each other several-fold), so its peak RSS is its own: lmtune.measure runs it, and
the child (every lmtune entry point) writes its own memory high-water mark as it exits, not the
figure wait4 reports, which carries the parent's peak.

`--smoke` (every script takes it) runs the same code on a tiny random model for a step or two and
writes its JSON and a rewritten copy of BENCHMARKS.md / README.md into a temporary folder: a check
that the script works, never a measurement.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from lmtune import measure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ("BENCHMARKS.md", "README.md")


@dataclass
class Run:
    wall_s: float
    peak_rss_gib: float
    log: Path


def run_child(command: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run `command` from the repository root, stdout into `log` and stderr beside it (`.stderr`);
    its wall time and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    errors, peak = log.with_name(log.name + ".stderr"), log.with_name(log.name + ".peak")
    peak.unlink(missing_ok=True)
    with open(log, "w") as out, open(errors, "w") as err:
        child = measure.run_child(command, stdout=out, stderr=err, cwd=ROOT,
                                  env=os.environ | (env or {}) | {measure.PEAK_RSS_FILE_ENV: str(peak)})
    if child.returncode != 0:
        tail = "\n".join(errors.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"{' '.join(command)} failed (exit {child.returncode}); the end of its output:\n{tail}")
    if not peak.is_file():
        sys.exit(f"{' '.join(command)} did not report its peak memory: run lmtune entry points only.")
    return Run(child.wall_s, round(int(peak.read_text()) / 2**30, 3), log)


def measure_in_child(script: str, spec: dict, log: Path) -> tuple[Run, Any]:
    """Run `script --child SPEC` in a child process (its work done by `child_main`): its wall time
    and peak RSS, and the JSON document it printed last."""
    run = run_child([sys.executable, script, "--child", json.dumps(spec)], log)
    return run, json.loads(log.read_text().splitlines()[-1])


def child_main(work: Callable[[dict], Any]) -> None:
    """The child's side of `measure_in_child`: when this process was started as `SCRIPT --child
    SPEC`, set it up as every lmtune entry point is (so its peak RSS reaches the parent), print
    work(SPEC)'s result as JSON on the last line of stdout and exit; otherwise return."""
    if sys.argv[1:2] != ["--child"]:
        return
    from lmtune.runtime import configure

    configure()
    print(json.dumps(work(json.loads(sys.argv[2]))))
    sys.exit(0)


def lmtune(*args: str) -> list[str]:
    """The command line of the lmtune CLI under this Python."""
    return [sys.executable, "-m", "lmtune.cli", *args]


TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def random_model(folder: Path, shape: dict, base: str = "default", dtype=None) -> str:
    """A model of `shape` with random weights (seeded), the rest of its config and its tokenizer
    from `base` (the default model unless named), saved in folder once; built on the GPU if there
    is one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtune.models.load import load_tokenizer, resolve_model

    if (folder / "config.json").exists():
        return str(folder)
    source = resolve_model(base)
    config = AutoConfig.from_pretrained(source)
    config.update(shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    load_tokenizer(source).save_pretrained(folder)
    return str(folder)


def tiny_model(folder: Path) -> str:
    """A 2-layer random model with the default model's architecture and tokenizer (as the tests
    build it), for --smoke runs."""
    return random_model(folder, TINY_SHAPE)


def gpu_bench(name: str, description: str | None) -> Bench:
    """The command line of a benchmark that needs a CUDA GPU: --base names the model whose config
    and tokenizer its random model takes; without a GPU only --smoke and --render-only run."""
    import torch

    bench = Bench(name, description, configure=lambda parser: parser.add_argument(
        "--base", default="default", help="the model whose config (all but the shape) and "
        "tokenizer the random model takes (default: the default model)"))
    bench.scratch.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not (bench.smoke or bench.args.render_only):
        sys.exit("no CUDA GPU here: run on a GPU machine, or pass --smoke to check the script.")
    return bench


LORA_RANK = 8


def lora_adapters(model: str, count: int, folder: Path) -> list[str]:
    """`count` LoRA adapters (rank LORA_RANK on every linear layer) for `model`, saved in folder:
    small random weights, so each changes the answers a little and costs what a trained adapter of
    that shape costs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lmtune.models.load import load_model, resolve_model
    from lmtune.runtime import configure

    configure()  # the libraries' import-time advice means nothing here
    peft_model = get_peft_model(load_model(resolve_model(model)), LoraConfig(
        r=LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM"))
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=1e-3 if "lora_B" in name else param.shape[1] ** -0.5)
        peft_model.save_pretrained(folder / f"adapter-{i}")
        paths.append(str(folder / f"adapter-{i}"))
    return paths


def folder_mib(path: str) -> float:
    """The size of the weights (*.safetensors) in a folder, in MiB."""
    return round(sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20, 2)


class Bench:
    """One benchmark's command line and destinations: benchmarks/results and the repository's
    documents, or with --smoke a scratch folder holding copies of them and a tiny model."""

    def __init__(self, name: str, description: str | None, configure=None,
                 settings: dict[str, tuple[str, int, int]] | None = None):
        """settings: {name: (help, value, value under --smoke)}, each an integer option --name
        (underscores as dashes); `self.settings` holds the values this run uses."""
        parser = argparse.ArgumentParser(description=description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--smoke", action="store_true",
                            help="tiny model, a step or two, results into a scratch folder: checks "
                                 "the script, measures nothing")
        parser.add_argument("--render-only", action="store_true",
                            help="run nothing: rewrite the document sections from the JSON there is")
        settings = settings or {}
        for key, (text, value, smoke_value) in settings.items():
            parser.add_argument("--" + key.replace("_", "-"), type=int, dest=key,
                                help=f"{text} ({value}; {smoke_value} with --smoke)")
        if configure:
            configure(parser)
        self.args = parser.parse_args()
        self.name = name
        self.smoke = self.args.smoke
        self.settings = {key: given if (given := getattr(self.args, key)) is not None else
                         (smoke_value if self.smoke else value)
                         for key, (_, value, smoke_value) in settings.items()}
        if self.smoke:
            # one folder per checkout: smoke runs in two checkouts at once must not swap documents
            checkout = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
            self.scratch = Path(tempfile.gettempdir()) / f"lmtune-bench-smoke-{checkout}"
            self.results = self.scratch / "results"
            self.results.mkdir(parents=True, exist_ok=True)
            for doc in DOCS:
                shutil.copy(ROOT / doc, self.scratch / doc)
            self.docs = self.scratch
        else:  # the runs' outputs go when the script ends; a failure has printed its log by then
            self.scratch = Path(tempfile.mkdtemp(prefix=f"lmtune-bench-{name}-"))
            atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)
            self.results, self.docs = RESULTS, ROOT

    @property
    def model(self) -> str:
        """The model measured: the default one, or under --smoke the tiny one."""
        return tiny_model(self.scratch / "tiny-model") if self.smoke else "default"

    def model_overrides(self) -> list[str]:
        """Overrides that put a config on the tiny model under --smoke; none otherwise."""
        return [f"model_name_or_path={self.model}"] if self.smoke else []

    def json_path(self, stem: str | None = None) -> Path:
        return self.results / f"{stem or self.name}.json"

    def write_json(self, data: Any, stem: str | None = None) -> Path:
        path = self.json_path(stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")
        return path

    def read_json(self, stem: str | None = None) -> Any:
        path = self.json_path(stem)
        if not path.exists():
            sys.exit(f"{path} does not exist yet: run this script without --render-only first.")
        return json.loads(path.read_text())

    def rewrite(self, doc: str, section: str, text: str) -> None:
        """Replace what lies between `<!-- bench:SECTION -->` and `<!-- /bench:SECTION -->` in doc."""
        path = self.docs / doc
        rewrite_section(path, section, text)
        print(f"{text}\n(rewrote section {section} of {path})\n")


def run_benchmark(name: str, description: str | None, settings: dict[str, tuple[str, int, int]],
                  child_work: Callable[[dict], Any], measure: Callable[[Bench], Any],
                  render: Callable[[Any], str]) -> None:
    """A benchmark whose measured work runs in one child (`measure_in_child`, `child_main`):
    measure(bench) -> the JSON, unless --render-only; render(JSON) -> its BENCHMARKS.md section,
    named as the benchmark."""
    child_main(child_work)
    bench = Bench(name, description, settings=settings)
    if not bench.args.render_only:
        bench.write_json(measure(bench))
    bench.rewrite("BENCHMARKS.md", name, render(bench.read_json()))


def rewrite_section(path: Path, section: str, text: str) -> None:
    content = path.read_text()
    pattern = re.compile(rf"(<!-- bench:{re.escape(section)} -->\n).*?(<!-- /bench:{re.escape(section)} -->)",
                         re.S)
    if not pattern.search(content):
        sys.exit(f"{path} has no <!-- bench:{section} --> ... <!-- /bench:{section} --> markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content))


def run_compare(bench: Bench, spec_path: str, smoke_values: dict[str, Any]) -> float:
    """`lmtune compare` on an example spec as a user runs it (under --smoke on the tiny model, one
    step, with smoke_values, into the scratch folder); its compare.{md,json,png} copied into the
    results as <bench name>.*; the whole run's wall time."""
    spec = ROOT / spec_path
    if bench.smoke:  # the example's own output_dir stays untouched
        shutil.rmtree(bench.scratch / "compare", ignore_errors=True)  # an earlier smoke run's
        values = yaml.safe_load(spec.read_text()) | {"output_dir": str(bench.scratch / "compare")} | smoke_values
        spec = bench.scratch / Path(spec_path).name
        spec.write_text(yaml.safe_dump(values))
    out = ROOT / yaml.safe_load(spec.read_text())["output_dir"]
    extra = [*bench.model_overrides(), "max_steps=1"] if bench.smoke else []
    whole = run_child(lmtune("compare", str(spec), *extra), bench.scratch / "compare.log")
    for suffix in ("md", "json", "png"):
        shutil.copy(out / f"compare.{suffix}", bench.results / f"{bench.name}.{suffix}")
    return whole.wall_s


def source_line(*stems: str) -> str:
    """The line under a table that names its JSON; tests/test_benchmarks_provenance.py reads it."""
    files = " and ".join(f"`benchmarks/results/{s}.json`" for s in stems)
    return f"Numbers from {files}."


def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A Markdown table; align holds one letter per column, l or r."""
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = [header, marks, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)

