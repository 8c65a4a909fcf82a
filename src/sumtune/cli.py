"""The `sumtune` command. Each subcommand's options are its dataclass's fields (see config.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from sumtune.errors import SumtuneError

CONTROL_KEYS = {"command", "config", "func", "json"}

EPILOG = """examples:
  sumtune demo                                         # the whole job offline on a tiny T5, < 3 min on a CPU
  sumtune train --config configs/t5-3b-billsum.yaml   # QLoRA T5-3b on BillSum (GPU)
  sumtune train --model t5-base --dataset my.jsonl --text-column article --summary-column highlights
  sumtune evaluate runs/sumtune --num-beams 4
  sumtune summarize runs/sumtune "Text to summarize ..."
  sumtune merge runs/sumtune merged/                   # plain bf16 model for transformers.pipeline
  sumtune memory --model t5-3b                         # footprint and trainable parameters
  sumtune inspect-data --dataset bills.jsonl --tokenizer t5-tokenizer/   # what 1024/128 tokens cut
  sumtune report runs/sumtune                          # one self-contained HTML page: plots, scores, samples
  sumtune push runs/sumtune my-name/t5-3b-billsum-lora # upload the adapter and its model card to the Hub
"""


def _overrides(ns: argparse.Namespace, drop: set[str] = frozenset()) -> dict:
    return {k: v for k, v in vars(ns).items() if k not in CONTROL_KEYS | set(drop)}


def _train_config(ns: argparse.Namespace, drop: set[str] = frozenset()):
    from sumtune import argparsing
    from sumtune.config import TrainConfig

    return argparsing.resolve(TrainConfig, ns.config, _overrides(ns, drop))


def cmd_train(ns: argparse.Namespace) -> int:
    from sumtune.api import train

    train(_train_config(ns))
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from sumtune.api import evaluate

    metrics = evaluate(ns.run_dir, dataset=ns.dataset, max_samples=ns.max_samples, num_beams=ns.num_beams,
                       max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size, output_dir=ns.output_dir,
                       device=ns.device, allow_pickle=ns.allow_pickle, trust_remote_code=ns.trust_remote_code)
    print(json.dumps(metrics, indent=2))
    return 0


def _read_documents(ns: argparse.Namespace) -> list[str]:
    docs = list(ns.text or [])
    for path in ns.file or []:
        from sumtune.safe_io import require_file

        p = require_file(path, "Input file")
        try:
            docs.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SumtuneError(f"Input file {str(p)!r} is not UTF-8 text.") from None
    if not docs:
        if sys.stdin is None or sys.stdin.isatty():
            raise SumtuneError("Nothing to summarize: give the text as an argument, with --file, or on stdin.")
        docs.append(sys.stdin.read())
    empty = [i for i, d in enumerate(docs) if not d.strip()]
    if empty:
        raise SumtuneError(f"Input document {empty[0] + 1} is empty.")
    return docs


def cmd_summarize(ns: argparse.Namespace) -> int:
    from sumtune.inference import Summarizer, check_generation_options

    docs = _read_documents(ns)
    check_generation_options(max_new_tokens=ns.max_new_tokens, num_beams=ns.num_beams)  # before the model loads
    summarizer = Summarizer.from_pretrained(ns.run_dir, device=ns.device, allow_pickle=ns.allow_pickle,
                                            trust_remote_code=ns.trust_remote_code)
    for summary in summarizer.summarize(docs, max_new_tokens=ns.max_new_tokens, num_beams=ns.num_beams):
        print(summary)
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from sumtune.inference import merge_run

    out = merge_run(ns.run_dir, ns.out_dir, dtype=ns.dtype, device=ns.device, allow_pickle=ns.allow_pickle,
                    trust_remote_code=ns.trust_remote_code)
    print(f"merged model written to {out} (load it with transformers.pipeline('summarization', model={str(out)!r}))")
    return 0


def cmd_memory(ns: argparse.Namespace) -> int:
    from sumtune.memory import memory_report

    report = memory_report(_train_config(ns))
    print(json.dumps(report.as_dict(), indent=2) if ns.json else report.format())
    return 0


def cmd_inspect_data(ns: argparse.Namespace) -> int:
    from sumtune.truncation import inspect_data

    cfg = _train_config(ns)
    inspection = inspect_data(cfg)
    print(json.dumps(inspection.as_dict(), indent=2, ensure_ascii=False) if ns.json else inspection.format(cfg))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from sumtune.demo import run_demo

    run_demo(output_dir=ns.output_dir, max_steps=ns.max_steps, progress=ns.progress)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from sumtune.report import render_report

    print(f"report written to {render_report(ns.run_dir, ns.output)}")
    return 0


def cmd_push(ns: argparse.Namespace) -> int:
    from sumtune.push import push_run

    print(f"pushed to {push_run(ns.run_dir, ns.repo, private=ns.private, token=ns.token)}")
    return 0


def cmd_profile(ns: argparse.Namespace) -> int:
    from sumtune import argparsing
    from sumtune.api import profile
    from sumtune.profiling import ProfileArgs, run_mobilenet_study
    from sumtune.profiling.profiler import write_json
    from sumtune.safe_io import check_output_location

    profile_keys = set(argparsing.field_types(ProfileArgs))
    profile_args = argparsing.from_mapping(ProfileArgs, {k: v for k, v in vars(ns).items() if k in profile_keys})
    if profile_args.workload == "mobilenet-cifar10":
        out = check_output_location(ns.output_dir if "output_dir" in ns else "runs/mobilenet-cifar10")
        allow_pickle = argparsing.coerce("allow_pickle", getattr(ns, "allow_pickle", False), bool)
        result = run_mobilenet_study(profile_args, out, allow_pickle=allow_pickle)
        write_json(result, out / "mobilenet_study.json")
        return 0
    profile(_train_config(ns, drop=profile_keys), profile_args)
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)", except where the help already says what the default is, or it is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from sumtune import argparsing
    from sumtune.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="sumtune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="QLoRA fine-tuning of T5 summarizers on one GPU (or many), with ROUGE evaluation, "
                    "summarization, adapter merging, and honest speed and memory numbers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    def run_options(p: argparse.ArgumentParser, device_help: str = "Where to run.") -> None:
        """Options of every command that loads a trained run."""
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help=device_help)
        p.add_argument("--allow-pickle", action="store_true", help="Also read pickle weights (.bin) for the base "
                                                                   "model and adapter; they can run code when loaded.")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="Let the base model run code from its own repository (never taken from the run's "
                            "config.yaml).")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE.yaml",
                       help="YAML file of options (keys = the option names below with underscores); options "
                            "given on the command line override it.")

    p = command("train", cmd_train, "Fine-tune a seq2seq model with QLoRA; writes the adapter, tokenizer, resolved "
                                    "config, metrics, TensorBoard logs, checkpoints and a model card to --output-dir.")
    config_option(p)
    argparsing.add_dataclass_arguments(p, TrainConfig)

    p = command("evaluate", cmd_evaluate, "Generate summaries for held-out documents and score them with "
                                          "ROUGE-1/2/L/Lsum; writes predictions.jsonl and metrics.json.")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`.")
    p.add_argument("--dataset", default=None, help="Evaluate on this data source instead of the run's held-out "
                                                   "split (a .jsonl/.csv/.parquet file, a save_to_disk dir, a hub name).")
    p.add_argument("--max-samples", type=int, default=None, help="Evaluate at most this many documents.")
    p.add_argument("--num-beams", type=int, default=None, help="Beam width (default: the run's).")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Longest summary in tokens (default: the run's).")
    p.add_argument("--batch-size", type=int, default=None, help="Documents per generation batch.")
    p.add_argument("--output-dir", default=None, help="Where to write predictions.jsonl and metrics.json "
                                                      "(default: RUN_DIR/eval).")
    run_options(p)

    p = command("summarize", cmd_summarize, "Summarize text with a trained run: from arguments, files, or stdin "
                                            "(one summary per line, in input order).")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`.")
    p.add_argument("text", nargs="*", help="Documents to summarize (each argument is one document).")
    p.add_argument("--file", action="append", help="A UTF-8 text file holding one document (repeatable).")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Longest summary in tokens (default: the run's).")
    p.add_argument("--num-beams", type=int, default=None, help="Beam width (default: the run's).")
    run_options(p)

    p = command("merge", cmd_merge, "Merge the adapter into its base (dequantized) and save a plain model that "
                                    "transformers loads as it is.")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`.")
    p.add_argument("out_dir", help="New directory for the merged model.")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="Dtype of the merged weights.")
    run_options(p, device_help="Where to merge.")

    p = command("memory", cmd_memory, "Footprint of a model in fp32 vs quantized vs quantized + adapters, and its "
                                      "total and trainable parameters, computed from its shapes (no weights needed).")
    config_option(p)
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    argparsing.add_dataclass_arguments(p, TrainConfig)

    p = command("inspect-data", cmd_inspect_data, "How many documents and summaries the length limits cut, "
                                                  "what share of their tokens, and the smallest --max-source-tokens"
                                                  " / --max-target-tokens that keep 95 in 100 whole; counted with "
                                                  "the tokenizer train would use, no model loaded.")
    config_option(p)
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    from sumtune.truncation import DATA_OPTIONS

    argparsing.add_dataclass_arguments(p, TrainConfig, skip=tuple(set(argparsing.field_types(TrainConfig))
                                                                  - set(DATA_OPTIONS)))

    p = command("demo", cmd_demo, "The whole job offline in under 3 minutes on a CPU: a tiny T5 quantized to NF4, "
                                  "QLoRA-trained on a corpus shipped with sumtune, ROUGE before and after, a sample "
                                  "summary.")
    p.add_argument("--output-dir", default="runs/demo", help="Run directory (replaced if it holds an earlier demo).")
    p.add_argument("--max-steps", type=int, default=None, help="Training steps (default: the demo's own).")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show progress bars.")

    p = command("report", cmd_report, "Render a run as one self-contained HTML page: config, final scores, "
                                      "evaluations over training, plots, sample summaries next to their "
                                      "references, and the profile summary when there is one.")
    p.add_argument("run_dir", help="Run directory written by `sumtune train` or `sumtune demo`.")
    p.add_argument("--output", metavar="FILE.html", default=None,
                   help="Where to write the page (default: RUN_DIR/report.html).")

    p = command("push", cmd_push, "Upload a run's adapter, model card, tokenizer, config, metrics and plots to a "
                                  "Hugging Face Hub model repository (created if needed).")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`.")
    p.add_argument("repo", help="Hub repository id, e.g. my-name/t5-3b-billsum-lora.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or the token "
                                                 "saved by `hf auth login`; prefer those, a flag shows in `ps`).")

    p = command("profile", cmd_profile, "Profile training steps with torch.profiler: step time, GPU utilization, "
                                        "memory, where the step goes, top kernels, and advice; writes a TensorBoard "
                                        "trace and summary.json under RUN_DIR/profile.")
    config_option(p)
    try:
        from sumtune.profiling import ProfileArgs

        argparsing.add_dataclass_arguments(p, ProfileArgs)
    except ImportError:  # pragma: no cover
        pass
    argparsing.add_dataclass_arguments(p, TrainConfig, skip=("profile_steps",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on AVX512-BF16 CPUs that its packed CPU kernel is missing; sumtune never uses that
    # kernel (modeling.keep_4bit_layout), so the warning would only confuse.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except SumtuneError as err:
        print(f"sumtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sumtune: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
