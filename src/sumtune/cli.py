"""The `sumtune` command. Each subcommand's options are its dataclass's fields (see config.py).

Building the parser imports no torch or transformers: `sumtune --help` (and every subcommand's) answers at once,
and the heavy libraries load when a command starts its work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

from sumtune.errors import SumtuneError

CONTROL_KEYS = {"command", "config", "func", "json"}

EPILOG = """examples:
  sumtune demo                                         # the whole job offline on a tiny T5, < 3 min on a CPU
  sumtune train --config configs/t5-3b-billsum.yaml   # QLoRA T5-3b on BillSum (GPU)
  sumtune train --model t5-base --dataset my.jsonl --text-column article --summary-column highlights
  sumtune evaluate runs/sumtune --num-beams 4
  sumtune summarize runs/sumtune "Text to summarize ..."
  sumtune summarize runs/sumtune --input docs.jsonl --output preds.jsonl   # batch: one summary per row, with its id
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


def _generation_overrides(ns: argparse.Namespace) -> dict:
    return {k: getattr(ns, k) for k in GENERATION_FLAGS}


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from sumtune.api import evaluate

    metrics = evaluate(ns.run_dir, dataset=ns.dataset, max_samples=ns.max_samples, batch_size=ns.batch_size,
                       name=ns.name, output_dir=ns.output_dir, device=ns.device, allow_pickle=ns.allow_pickle,
                       trust_remote_code=ns.trust_remote_code, progress=ns.progress, **_generation_overrides(ns))
    print(json.dumps(metrics, indent=2))
    return 0


def _read_documents(ns: argparse.Namespace):
    """Documents from --input, the text arguments (`-`: stdin) and --file, or stdin when none is given."""
    from sumtune.documents import Document, check_documents, read_documents, read_stdin, split_text

    if ns.input is not None:
        if ns.text or ns.file:
            raise SumtuneError("Give the documents either with --input or as text / --file, not both.")
        return read_documents(ns.input, lines=ns.lines, text_column=ns.text_column)
    texts = []
    for text in ns.text or []:
        texts.extend([read_stdin()] if text == "-" else [text])
    for path in ns.file or []:
        from sumtune.safe_io import require_file

        p = require_file(path, "Input file")
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SumtuneError(f"Input file {str(p)!r} is not UTF-8 text.") from None
    if not texts:
        if sys.stdin is None or sys.stdin.isatty():
            raise SumtuneError("Nothing to summarize: give the text as an argument, with --file or --input, "
                               "or on stdin.")
        texts.append(sys.stdin.read())
    if not ns.lines:
        docs = [Document(i, text) for i, text in enumerate(texts)]
    else:  # ids: line numbers, counted on through the inputs in order
        docs, first = [], 0
        for text in texts:
            docs += split_text(text, lines=True, first_id=first)
            first += len(text.splitlines())
    check_documents(docs)
    return docs


def cmd_summarize(ns: argparse.Namespace) -> int:
    from sumtune.config import check_generation_settings
    from sumtune.documents import STDIN, write_predictions
    from sumtune.inference import Summarizer, check_generation_options

    check_generation_options(max_new_tokens=ns.max_new_tokens, num_beams=ns.num_beams, batch_size=ns.batch_size)
    check_generation_settings(**_generation_overrides(ns))  # before the model loads
    if ns.output is not None and ns.output != STDIN:
        from sumtune.safe_io import check_output_location

        check_output_location(ns.output, "Output file", is_file=True)
    docs = _read_documents(ns)
    summarizer = Summarizer.from_pretrained(ns.run_dir, device=ns.device, allow_pickle=ns.allow_pickle,
                                            trust_remote_code=ns.trust_remote_code, progress=ns.progress)
    summaries = summarizer.summarize([d.text for d in docs], batch_size=ns.batch_size, progress=ns.progress,
                                     **_generation_overrides(ns))
    if ns.output is None:
        for summary in summaries:
            print(summary)
        return 0
    written = write_predictions(ns.output, docs, summaries)
    if written is not None:
        print(f"sumtune: {len(docs)} summaries written to {written}", file=sys.stderr)
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from sumtune.inference import merge_run

    out = merge_run(ns.run_dir, ns.out_dir, dtype=ns.dtype, device=ns.device, allow_pickle=ns.allow_pickle,
                    trust_remote_code=ns.trust_remote_code, progress=ns.progress)
    print(f"merged model written to {out} (load it with transformers.pipeline('summarization', model={str(out)!r});"
          f" upload it with `sumtune push {out} REPO`)")
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

    print(f"pushed to {push_run(ns.run_dir, ns.repo, private=ns.private, token=ns.token, progress=ns.progress)}")
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


GENERATION_FLAGS = ("max_new_tokens", "num_beams", "min_new_tokens", "length_penalty", "no_repeat_ngram_size")


def build_parser() -> argparse.ArgumentParser:
    from sumtune import argparsing
    from sumtune.config import TrainConfig
    from sumtune.version import __version__

    parser = argparsing.ArgumentParser(
        prog="sumtune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="QLoRA fine-tuning of T5 summarizers on one GPU (or many), with ROUGE evaluation, "
                    "summarization, adapter merging, and honest speed and memory numbers.")
    parser.add_argument("--version", action="version", version=f"sumtune {__version__}")
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

    def progress_option(p: argparse.ArgumentParser, help_: str = "Progress bars on a terminal (elsewhere, and with "
                        "--no-progress: plain lines, no bars).") -> None:
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=help_)

    def generation_options(p: argparse.ArgumentParser) -> None:
        docs = argparsing.field_docs(TrainConfig)
        types_ = {"max_new_tokens": int, "num_beams": int, "min_new_tokens": int, "length_penalty": float,
                  "no_repeat_ngram_size": int}
        for name in GENERATION_FLAGS:
            p.add_argument("--" + name.replace("_", "-"), type=types_[name], default=None, metavar=name.upper(),
                           help=f"{docs[name]} (default: the run's)".replace("%", "%%"))

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE.yaml",
                       help="YAML file of options (keys = the option names below with underscores); options "
                            "given on the command line override it.")

    p = command("train", cmd_train, "Fine-tune a seq2seq model with QLoRA; writes the adapter, tokenizer, resolved "
                                    "config, metrics, TensorBoard logs, checkpoints and a model card to --output-dir.")
    config_option(p)
    argparsing.add_dataclass_arguments(p, TrainConfig)

    p = command("evaluate", cmd_evaluate, "Generate summaries for held-out documents and score them with "
                                          "ROUGE-1/2/L/Lsum; writes predictions.jsonl and metrics.json to a new "
                                          "RUN_DIR/eval/NAME/.")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`.")
    p.add_argument("--dataset", default=None, help="Evaluate on this data source instead of the run's held-out "
                                                   "split (a .jsonl/.csv/.parquet file, a save_to_disk dir, a hub name).")
    p.add_argument("--max-samples", type=int, default=None, help="Evaluate at most this many documents.")
    p.add_argument("--batch-size", type=int, default=None, help="Documents per generation batch.")
    generation_options(p)
    p.add_argument("--name", default=None, help="Write to RUN_DIR/eval/NAME (default: a new name, `heldout-` or the "
                                                "dataset's name, then the date and time).")
    p.add_argument("--output-dir", default=None, help="Write here instead of RUN_DIR/eval/NAME. The training's own "
                                                      "final evaluation in RUN_DIR/eval/ is never replaced unless "
                                                      "this points there.")
    run_options(p)
    progress_option(p)

    p = command("summarize", cmd_summarize, "Summarize text with a trained run: from arguments, files, a table "
                                            "(--input docs.jsonl/.csv) or stdin; one summary per line, or JSON "
                                            "Lines with each document's id (--output).")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`, or the hub id it was pushed to.")
    p.add_argument("text", nargs="*", help="Documents to summarize (each argument is one document; `-` reads stdin).")
    p.add_argument("--file", action="append", help="A UTF-8 text file holding one document (repeatable).")
    p.add_argument("--input", metavar="FILE", default=None,
                   help="Documents to summarize in a batch: .jsonl/.json/.csv/.parquet (one per row, from "
                        "--text-column; the `id` column is kept, else the row number), .txt (one document, or one "
                        "per line with --lines), or `-` for stdin.")
    p.add_argument("--lines", action="store_true", help="Plain text holds one document per line (blank lines "
                                                        "skipped; ids are line numbers).")
    p.add_argument("--text-column", default="text", help="Column of --input holding the documents.")
    p.add_argument("--output", metavar="FILE.jsonl", default=None,
                   help='Write JSON Lines {"id": ..., "summary": ...} in input order (`-`: stdout); default: one '
                        "summary per line on stdout.")
    p.add_argument("--batch-size", type=int, default=None, help="Documents per generation batch (default: the run's "
                                                                "eval_batch_size).")
    generation_options(p)
    run_options(p)
    progress_option(p)

    p = command("merge", cmd_merge, "Merge the adapter into its base (dequantized) and save a plain model that "
                                    "transformers loads as it is.")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`.")
    p.add_argument("out_dir", help="New directory for the merged model.")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="Dtype of the merged weights.")
    run_options(p, device_help="Where to merge.")
    progress_option(p)

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
    if "progress" not in DATA_OPTIONS:
        progress_option(p)

    p = command("demo", cmd_demo, "The whole job offline in under 3 minutes on a CPU: a tiny T5 quantized to NF4, "
                                  "QLoRA-trained on a corpus shipped with sumtune, ROUGE before and after, a sample "
                                  "summary.")
    p.add_argument("--output-dir", default="runs/demo", help="Run directory (replaced if it holds an earlier demo).")
    p.add_argument("--max-steps", type=int, default=None, help="Training steps (default: the demo's own).")
    progress_option(p)

    p = command("report", cmd_report, "Render a run as one self-contained HTML page: config, final scores, "
                                      "evaluations over training, plots, sample summaries next to their "
                                      "references, and the profile summary when there is one.")
    p.add_argument("run_dir", help="Run directory written by `sumtune train` or `sumtune demo`.")
    p.add_argument("--output", metavar="FILE.html", default=None,
                   help="Where to write the page (default: RUN_DIR/report.html).")
    progress_option(p, "Accepted as by every command; the report is drawn without progress bars.")

    p = command("push", cmd_push, "Upload a run's adapter, model card, tokenizer, config, metrics and plots to a "
                                  "Hugging Face Hub model repository (created if needed).")
    p.add_argument("run_dir", help="Run directory written by `sumtune train`, or a merged model written by "
                                   "`sumtune merge`.")
    p.add_argument("repo", help="Hub repository id, e.g. my-name/t5-3b-billsum-lora.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or the token "
                                                 "saved by `hf auth login`; prefer those, a flag shows in `ps`).")
    progress_option(p, "The hub's upload bars on a terminal (--no-progress: none).")

    p = command("profile", cmd_profile, "Profile training steps with torch.profiler: step time, GPU utilization, "
                                        "memory, where the step goes, top kernels, and advice; writes a TensorBoard "
                                        "trace and summary.json under RUN_DIR/profile.")
    config_option(p)
    from sumtune.profiling.runner import ProfileArgs  # no torch: the profiler loads when a profile runs

    argparsing.add_dataclass_arguments(p, ProfileArgs)
    argparsing.add_dataclass_arguments(p, TrainConfig, skip=("profile_steps",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on AVX512-BF16 CPUs that its packed CPU kernel is missing; sumtune never uses that
    # kernel (modeling.keep_4bit_layout), so the warning would only confuse.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # one line naming the first unknown option and what it most likely meant; exit status 2
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[ns.command].unknown_arguments(unknown)
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
