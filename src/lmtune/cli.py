"""`lmtune train|chat|export|plan|compare|serve|predict|eval|webui`: every subcommand reads the same
YAML keys.

A mistake the user can fix (LmtuneError) prints one message and exits with code 2; `--debug` shows
the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from lmtune import allocator
from lmtune.config import RunConfig, check_training_inputs, describe_keys, load_config
from lmtune.errors import LmtuneError
from lmtune.runtime import configure, leave_out_bitsandbytes


def _config(args: argparse.Namespace, **fixed) -> RunConfig:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides  # `lmtune chat key=value` with no YAML
    overrides += [f"{k}={v}" for k, v in fixed.items() if v is not None]
    return load_config(config, overrides)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.as_command:  # the command line itself, not main() called from Python
        allocator.restart_with(cfg.allocator)  # before torch is imported: restarting is cheap then
        allocator.forget_preload()
        leave_out_bitsandbytes(cfg)  # before peft is imported
    from lmtune.train import STAGES

    from lmtune import distributed

    if cfg.do_predict and not cfg.do_train:  # LLaMA-Factory's predict-only run
        from lmtune.evaluate.predict import run_predict

        run_predict(cfg)
        return
    check_training_inputs(cfg)
    if args.nproc > 1 and distributed.world_size() == 1:
        # Checked above in this process, so a config mistake is reported once, before any rank.
        distributed.launch(args.nproc, ["-m", "lmtune.cli", "train", args.config,
                                        *args.overrides, *(["--debug"] if args.debug else [])])
        return
    for key, reason in sorted(cfg.not_applied.items()):
        print(f"note: {key} is accepted but not applied here ({reason})")
    results = STAGES[cfg.stage](cfg)
    if results:
        shown = {k: results[k] for k in ("train_loss", "eval_loss", "train_runtime",
                                         "train_tokens_per_second") if k in results}
        print("done: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        print(f"model saved in {cfg.output_dir}")


def cmd_chat(args: argparse.Namespace) -> None:
    from lmtune.infer.chat import ChatSession, answer_file, interactive

    cfg = _config(args, model_name_or_path=args.model, adapter_name_or_path=args.adapter)
    session = ChatSession.from_config(cfg, use_trained=not args.base)
    if args.prompt is not None:
        session.answer_once(args.prompt, sample=args.sample)
    elif args.prompts is not None:
        answer_file(session, args.prompts, cfg.data_vars, save=args.save, sample=args.sample)
    else:
        interactive(session)


def cmd_export(args: argparse.Namespace) -> None:
    from lmtune.export import export

    export(_config(args, export_dir=args.export_dir))


def cmd_plan(args: argparse.Namespace) -> None:
    import json
    from itertools import islice

    from lmtune.plan import build_plan, dump_encoded, plan_lines, show_row

    cfg = _config(args)
    plan, data, tokenizer = build_plan(cfg, measure_steps=args.measure_steps if args.measure else 0,
                                       world_size=args.world_size)
    if args.dump_encoded:
        count = dump_encoded(data, args.dump_encoded)
        plan["dumped"] = {"file": args.dump_encoded, "rows": count}
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    print("\n".join(plan_lines(plan, data.report)))
    examples = (list(islice(data.train.encoded(), args.examples)) if cfg.streaming
                else data.train[: args.examples])
    for i, row in enumerate(examples):
        print(f"== example {i} (trained tokens «like this») ==\n{show_row(tokenizer, row)}")
    if args.dump_encoded:
        print(f"wrote {plan['dumped']['rows']:,} encoded rows to {args.dump_encoded}")


def cmd_predict(args: argparse.Namespace) -> None:
    from lmtune.evaluate.predict import run_predict

    run_predict(_config(args, model_name_or_path=args.model, adapter_name_or_path=args.adapter),
                compare_base=args.compare_base)


def cmd_eval(args: argparse.Namespace) -> None:
    from lmtune.evaluate.benchmarks import run_eval

    run_eval(_config(args), args.models)


def cmd_compare(args: argparse.Namespace) -> None:
    from lmtune.compare import run_compare

    run_compare(args.config, list(args.overrides))


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from lmtune.serve.app import serve

    cfg = _config(args, model_name_or_path=args.model)
    serve(cfg, args.adapter, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("LMTUNE_API_KEY") or None, cors_origins=args.cors,
          max_batch=args.max_batch, max_tokens=args.max_tokens)


def cmd_webui(args: argparse.Namespace) -> None:
    from lmtune.webui.app import serve

    serve(args.host, args.port, args.runs_dir, allow_remote=args.allow_remote)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtune", description="Fine-tune LLMs from one YAML file.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    epilog = "config keys (YAML or key=value):\n" + describe_keys()

    def add(name: str, help_text: str, config_required: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs=None if config_required else "?", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    train = add("train", "train a model as the config says", True)
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train as N processes on this machine (starts torchrun; DDP, or FSDP2 / "
                       "DeepSpeed when the config asks); under torchrun or accelerate launch "
                       "already, leave it out")
    train.set_defaults(func=cmd_train)

    chat = add("chat", "chat in the terminal with a model, its adapter, or a trained output_dir", False)
    chat.add_argument("--model", help="model_name_or_path (overrides the config)")
    chat.add_argument("--adapter", help="adapter_name_or_path (overrides the config)")
    chat.add_argument("--base", action="store_true", help="ignore what output_dir holds: the base model")
    chat.add_argument("--prompt", help="answer this one message and exit (greedy unless --sample)")
    chat.add_argument("--prompts", help="JSON list of {prompt, expect?}: answer each, count hits")
    chat.add_argument("--save", help="with --prompts: write the answers to this JSON file")
    chat.add_argument("--sample", action="store_true", help="sample with the config's settings")
    chat.set_defaults(func=cmd_chat)

    export = add("export", "merge an adapter (LoRA family, AdaLoRA, IA3) into its base, or re-export "
                 "a model, as a standalone HF folder or GGUF file with an Ollama Modelfile", True)
    export.add_argument("--export-dir", dest="export_dir", help="export_dir (overrides the config)")
    export.set_defaults(func=cmd_export)

    compare = sub.add_parser(
        "compare", help="train several variants of a config and compare them",
        description="Train each variant of compare.yaml on the same data and seed, one after "
        "another in its own process, then write compare.md, compare.json and compare.png "
        "(trainable parameters, peak memory, wall time, tokens/s, losses, task score, size). "
        "key=value overrides apply to the base.")
    compare.add_argument("config", help="compare YAML (see examples/compare_methods.yaml)")
    compare.add_argument("overrides", nargs="*", help="key=value overrides of the base's keys")
    compare.add_argument("--debug", action="store_true", help="show tracebacks")
    compare.set_defaults(func=cmd_compare)

    predict = add("predict", "answer every eval_dataset row and score the answers (BLEU-4, ROUGE, "
                  "exact match) into output_dir", False)
    predict.add_argument("--model", help="model_name_or_path (overrides the config)")
    predict.add_argument("--adapter", help="adapter_name_or_path (overrides the config)")
    predict.add_argument("--compare-base", dest="compare_base", action="store_true",
                         help="also predict with the base (adapter switched off), side by side")
    predict.set_defaults(func=cmd_predict)

    evaluate = add("eval", "score models on a multiple-choice benchmark (MMLU / CMMLU / C-Eval "
                   "layout): accuracy per subject and category", False)
    evaluate.add_argument("--models", nargs="+", metavar="MODEL",
                          help="several models or adapter folders, the base first: each one's "
                          "accuracy change against the base is shown per category")
    evaluate.set_defaults(func=cmd_eval)

    plan = add("plan", "count the data, steps, parameters and memory a training run would use, "
               "without training", True)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--world-size", dest="world_size", type=int, metavar="N",
                      help="plan for N training processes (default: WORLD_SIZE, else 1): the "
                      "effective batch and the memory per rank of DDP, FSDP2 and ZeRO-2/3")
    plan.add_argument("--measure", action="store_true",
                      help="run a few real training steps for tokens/s and the wall time")
    plan.add_argument("--measure-steps", dest="measure_steps", type=_positive_int, default=3,
                      help="steps --measure times, after one warm-up step (default 3)")
    plan.add_argument("--examples", type=int, default=0, metavar="N",
                      help="show N encoded training rows decoded, trained tokens marked")
    plan.add_argument("--dump-encoded", dest="dump_encoded", metavar="FILE",
                      help="write every encoded row (input_ids, labels) as JSON Lines")
    plan.set_defaults(func=cmd_plan)

    serve = add("serve", "serve a model and its adapters over HTTP in OpenAI's API shapes", False)
    serve.add_argument("--model", help="model_name_or_path (overrides the config)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="serve this adapter as model NAME (repeatable)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; any other needs an API key)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", dest="api_key",
                       help="require 'Authorization: Bearer KEY' on every route (default: "
                       "LMTUNE_API_KEY); loading adapters at run time needs one")
    serve.add_argument("--cors", action="append", metavar="ORIGIN",
                       help="let web pages from ORIGIN call the API (repeatable; none by default)")
    serve.add_argument("--max-batch", dest="max_batch", type=int, default=16,
                       help="most requests generated together in one batch (default 16)")
    serve.add_argument("--max-tokens", dest="max_tokens", type=int,
                       help="most tokens one request may ask for (default: max_new_tokens)")
    serve.set_defaults(func=cmd_serve)

    webui = sub.add_parser(
        "webui", help="a web page to train, chat, compare and export",
        description="Serve a page for the current folder: train from a form (plan, YAML, live "
        "loss, stop and resume), chat with the base model or a trained run, see compare reports, "
        "export a run. Paths are relative to the current folder, as in a YAML.")
    webui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    webui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    webui.add_argument("--runs-dir", dest="runs_dir", default="saves/webui",
                       help="folder for the runs started from the page (default saves/webui)")
    webui.add_argument("--allow-remote", dest="allow_remote", action="store_true",
                       help="allow a --host other than loopback (the page has no login)")
    webui.add_argument("--debug", action="store_true", help="show tracebacks")
    webui.set_defaults(func=cmd_webui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.as_command = argv is None
    configure()
    try:
        args.func(args)
    except LmtuneError as exc:
        from lmtune.distributed import record_error

        if args.debug:
            traceback.print_exc()
        if not record_error(exc):  # a rank under `--nproc`: the launcher reports it once
            print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
