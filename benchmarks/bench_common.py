"""Helpers shared by sumtune's benchmarks: model shapes, random QLoRA T5s, real BillSum data, timing, results.

Benchmarks import this file by path (``sys.path`` gets ``benchmarks/``); sumtune itself never imports it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))
if str(Path(__file__).resolve().parent) not in sys.path:  # patch_tokens beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

# One table of T5 shapes, one config builder and one FLOP count for the product and its benchmarks.
from sumtune.flops import FLOPS_COUNTED, train_flops_per_sample  # noqa: E402,F401
from sumtune.modeling import (  # noqa: E402,F401
    T5_SHAPES as _PRODUCT_T5_SHAPES, T5_VOCAB_SIZE, t5_config, untie_head_if_untied)

T5_SHAPES = list(_PRODUCT_T5_SHAPES)  # "tiny" among them: CPU plumbing checks only


# ----------------------------------------------------------------------------- data
def shared_data_dir(shared_dir: str | Path | None = None) -> Path:
    """../shared/data next to the repo, or $SUMTUNE_SHARED_DATA, or the given directory."""
    if shared_dir is not None:
        return Path(shared_dir)
    env = os.environ.get("SUMTUNE_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def load_billsum_texts(shared_dir: str | Path | None = None) -> list[dict]:
    """The 200 real BillSum rows (clean text) as ``{"text", "summary"}`` dicts."""
    path = shared_data_dir(shared_dir) / "billsum" / "us_train_subset200_cleantext.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"BillSum rows not found at {path} (set SUMTUNE_SHARED_DATA)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows.append({"text": row["text"], "summary": row["summary"]})
    return rows


def load_t5_tokenizer(shared_dir: str | Path | None = None):
    """The real T5 sentencepiece tokenizer from shared/data/t5-tokenizer (no hub access)."""
    from transformers import AutoTokenizer

    path = shared_data_dir(shared_dir) / "t5-tokenizer"
    if not path.is_dir():
        raise FileNotFoundError(f"T5 tokenizer not found at {path} (set SUMTUNE_SHARED_DATA)")
    return AutoTokenizer.from_pretrained(str(path))


def tokenize_rows(tokenizer, rows: list[dict], src_len: int, tgt_len: int,
                  prefix: str = "summarize: ") -> dict[str, torch.Tensor]:
    """Pad/truncate to fixed lengths; labels are -100 where the target is padding."""
    source = tokenizer([prefix + r["text"] for r in rows], max_length=src_len, truncation=True,
                       padding="max_length", return_tensors="pt")
    target = tokenizer([r["summary"] for r in rows], max_length=tgt_len, truncation=True,
                       padding="max_length", return_tensors="pt")
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"], "labels": labels}


def batch_at(data: dict[str, torch.Tensor], step: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Batch number ``step`` of a fixed-order pass over ``data``, wrapping around."""
    rows = data["input_ids"].shape[0]
    index = (torch.arange(batch_size) + step * batch_size) % rows
    return {k: v[index.to(v.device)] for k, v in data.items()}


# ----------------------------------------------------------------------------- models
def random_t5(config, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", seed: int = 0):
    """T5ForConditionalGeneration with T5's own random init, built directly on ``device`` in ``dtype``.

    Built in ``dtype`` (default-dtype switch) so T5-3b never has an fp32 copy on the GPU.
    """
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = untie_head_if_untied(T5ForConditionalGeneration(config))  # FLAN-T5: the head's own weight
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def quantize_linear4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4",
                        double_quant: bool = True, skip: tuple[str, ...] = ("lm_head",),
                        device: str | torch.device | None = None) -> nn.Module:
    """Replace every plain nn.Linear (but those named in ``skip``) by a frozen bnb Linear4bit, in place.

    sumtune's own quantizer (`sumtune.modeling.quantize_in_place`), on ``device`` (default: where the model is).
    For the reference recipe pass ``skip=("lm_head", "wo")``: from_pretrained keeps T5's ``wo`` unquantized.
    """
    from sumtune.modeling import DTYPES, QuantSettings, freeze, quantize_in_place

    dtype_name = {dtype: name for name, dtype in DTYPES.items()}[compute_dtype]
    target = torch.device(device) if device is not None else next(model.parameters()).device
    return freeze(quantize_in_place(model, QuantSettings(quant_type, dtype_name, double_quant), target,
                                    skip=tuple(skip)))


def count_lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


# ----------------------------------------------------------------------------- hardware + FLOPs
def sync(device: torch.device) -> None:
    """Wait for `device`'s GPU (timings end here; each torchrun rank waits for its own); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, stream, accum: int, lr: float, count: int):
    """`count` optimizer steps of the product's `TrainStep` as `sumtune train`'s loop takes them: draw the micro-batches
    (collation on the host), run the step, read its result. Yields (index, result, seconds from the draw to the read):
    the draw is on the clock, as in training."""
    import time

    for index in range(count):
        sync(step.device)
        start = time.perf_counter()
        result = step(step.draw(stream, accum), lr=lr)
        sync(step.device)
        yield index, result, time.perf_counter() - start


def cuda_event_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream: events around each call, the calls back to back
    and one sync at the end, so that each pair times the GPU's work while the host queues the next call (as in CUDA
    graphs and a training step) rather than the host's launch latency too. Until 2026-12-04 (session 33) a sync
    followed each call, which added the Python launch path to every figure: ncu timed the Gluon decode kernel at
    0.68 ms where that method gave 0.92-1.11 (results/logs/ncu_gluontma_256_details_s33-...)."""
    import statistics

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def cuda_graph_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``'s GPU work captured once in a CUDA graph and replayed back to back (as
    generation replays its decoding steps): no host launch path inside the figure, which back-to-back eager calls
    still carry where the host takes longer to issue a call's kernels than the GPU to run them (a small launch and
    its ~10 torch ops). Warm-up (compiles, autotuning) runs eagerly on a side stream before the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_event_ms(graph.replay, repeats, warmup=1)


def free_gpu_memory() -> None:
    """Drop what the last measurement left (Python garbage, cached blocks) and restart the peak counter."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- setting tokens
# The TrainConfig overrides a benchmark setting token stands for (settings are tokens joined by ':', e.g.
# "config:ldrop0:fusedlora" or "b8:gc"); `mem<N>` is max_memory_gib N (decimals allowed), `b<N>` the micro-batch and
# `bauto` batch_size auto.
CONFIG_TOKENS: dict[str, dict] = {
    "gc": {"gradient_checkpointing": True}, "nogc": {"gradient_checkpointing": False},
    "compile": {"compile": True}, "nocompile": {"compile": False},
    "cache": {"cache_dequantized_weights": True}, "nocache": {"cache_dequantized_weights": False},
    "graphs": {"cuda_graphs": True}, "nograph": {"cuda_graphs": False},
    "buckets": {"pad_to_buckets": True}, "nobuckets": {"pad_to_buckets": False},
    "group": {"group_by_length": True},
    "fusedlora": {"fused_lora": True}, "nofused": {"fused_lora": False}, "loragemm": {"lora_in_base_gemm": True},
    "noloragemm": {"lora_in_base_gemm": False},
    "drop0": {"model_dropout": 0.0},  # T5's own dropout off: the targets keep 0.1, so for comparison only
    "ldrop0": {"lora_dropout": 0.0}, "ldrop5": {"lora_dropout": 0.05},  # ldrop5: the reference's LoRA dropout
    "sdpa": {"attention_backend": "sdpa"}, "triton": {"attention_backend": "triton"},
    "fusedffn": {"fused_ffn_dropout": True}, "nofusedffn": {"fused_ffn_dropout": False},
    "fusedgated": {"fused_gated_ffn": True}, "nofusedgated": {"fused_gated_ffn": False},
    "adamw": {"optimizer": "adamw"}, "paged": {"optimizer": "paged_adamw_8bit"}, "adamw8": {"optimizer": "adamw_8bit"},
}


# Module-constant tokens (`nopairs`, `noldscratch`, ...) and the context manager that sets them: patch_tokens.py.
from patch_tokens import PATCH_TOKENS, patch_strings, patched  # noqa: E402,F401


# The decoding cross-attention kernel's tiles (sumtune.generation.cross_attention), as benchmarks take them.
FUSED_TILES_HELP = ("comma-separated BLOCK_NxWARPSxHEADSxSTAGES[xMIN_PROGRAMS] specs of "
                    "sumtune.generation.cross_attention (e.g. 32x8x16x3; a fifth number splits each row's keys until "
                    "the launch has that many programs, shipped 264)")


def parse_fused_tiles(text: str) -> list[tuple[int, ...]]:
    """``"64x8x16x2,32x8x16x3x1024"`` -> [(64, 8, 16, 2), (32, 8, 16, 3, 1024)] (keys a tile, warps, heads a program,
    stages, and optionally the programs a launch aims for)."""
    specs = [tuple(int(v) for v in spec.split("x")) for spec in text.split(",") if spec]
    bad = [spec for spec in specs if len(spec) not in (4, 5)]
    if bad:
        raise SystemExit(f"fused tiles need 4 or 5 numbers each ({FUSED_TILES_HELP}): {bad}")
    return specs


def fused_tiles(tiles: tuple[int, ...] | str | None):
    """The fused cross-attention kernel's tiles set to ``tiles`` (a tuple or one spec) for the block (none: as
    shipped)."""
    from unittest import mock

    from sumtune.generation import cross_attention

    if not tiles:
        return contextlib.nullcontext()
    spec = parse_fused_tiles(tiles)[0] if isinstance(tiles, str) else tuple(tiles)
    values = dict(zip(("HEADS_PER_PROGRAM", "NUM_STAGES", "MIN_PROGRAMS"), spec[2:]))
    return mock.patch.multiple(cross_attention, TILES_BY_STATES=((0, spec[0], spec[1]),), **values)


def setting_fields(text: str, extra=None) -> dict:
    """The TrainConfig overrides of a settings string. `extra(token, fields) -> bool` handles a benchmark's own tokens
    (True when it took the token). A setting names its micro-batch (`b<N>`) unless it starts from a config file
    (`config`, whose `batch_size: auto` resolves at build); an unknown token ends the run with its name."""
    fields: dict = {}
    for token in text.split(":"):
        if token == "config" or token in PATCH_TOKENS:  # the config file's own settings; patches: `patched`
            continue
        if token[:1] == "b" and token[1:].isdigit():
            fields["batch_size"] = int(token[1:])
        elif token == "bauto":  # the largest micro-batch that fits (under `mem<N>` when given)
            fields["batch_size"] = "auto"
        elif re.fullmatch(r"mem\d+(\.\d+)?", token):  # e.g. mem15.3: the reference's own peak
            fields["max_memory_gib"] = float(token[3:])
        elif token in CONFIG_TOKENS:
            fields.update(CONFIG_TOKENS[token])
        elif extra is None or not extra(token, fields):
            raise SystemExit(f"unknown setting token {token!r} in {text!r}")
    if "batch_size" not in fields and not text.startswith("config"):
        raise SystemExit(f"setting {text!r} needs a micro-batch token like b16 (or start with 'config')")
    return fields


def benchmark_device(name: str, quick: bool) -> torch.device | None:
    """The GPU a benchmark runs on, or the CPU for its --quick plumbing check; None (after saying why) otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not quick:
        print(f"{name} needs a CUDA GPU; use --quick for a CPU plumbing check.", file=sys.stderr)
        return None
    return device


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str | None = None) -> str:
    """File-name form of a GPU name (this machine's by default): "NVIDIA H200" -> "h200"."""
    name = (name or gpu_name()).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def measure_bf16_matmul_tflops(size: int = 8192, iters: int = 20) -> float | None:
    """Median achieved TFLOP/s of a large bf16 GEMM on this GPU; None on CPU (the product's measurement, the
    one `sumtune train` divides its second MFU figure by)."""
    from sumtune.flops import measure_bf16_matmul_tflops as measure

    return measure(torch.device("cuda"), size, iters) if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- results
def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):  # triton: some kernel defaults follow it
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            versions[name] = "missing"
    return versions


def save_result(name: str, payload: dict, slug: str | None = None) -> Path:
    """Write benchmarks/results/<name>-<YYYY-MM-DD>-<gpu-slug>.json (or -2, -3, ... after it: never over an earlier
    file) with environment metadata.

    `payload` may override `gpu`/`versions` (a summary made on another machine than the runs'), and `slug`
    the file name's machine part."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    today = _dt.date.today().isoformat()
    stem = f"{name}-{today}-{slug or gpu_slug()}"
    record = {"name": name, "date": today, "gpu": gpu_name(), "versions": library_versions(), **payload}
    text = json.dumps(record, indent=2, default=str) + "\n"
    # A second run of the same day and machine gets -2, -3, ...: it must not overwrite the first one's figures
    # (session 41's seed profile was lost so, under the shipped config's run). "x" mode: no race with a twin.
    for attempt in itertools.count(1):
        path = RESULTS_DIR / (f"{stem}.json" if attempt == 1 else f"{stem}-{attempt}.json")
        try:
            with path.open("x", encoding="utf-8") as handle:
                handle.write(text)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def saved_if_interrupted(name: str, partial: dict):
    """Around a benchmark's run: on SIGINT (Ctrl-C, or the device calls' `timeout --signal=INT`) save ``partial``
    (the rows measured so far and what else the script has put in it) as a result file that says it was cut, then
    stop as interrupted. Session 45 lost two generation runs' files to their time limits (rebuilt from logs). A run
    that saved its own file sets ``partial["saved"]``."""
    try:
        yield partial
    except KeyboardInterrupt:
        if partial.get("rows") and not partial.get("saved"):
            record = {key: value for key, value in partial.items() if key != "saved"}
            record["interrupted"] = "stopped by SIGINT (a time limit) before the run ended: these are the rows it had " \
                                    "finished"
            print(f"\ninterrupted: saved {save_result(name, record)}", flush=True)
        raise


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Plain fixed-width table of ``rows`` (dicts) restricted to ``columns``."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


# ----------------------------------------------------------------------------- out-of-memory reports
def record_memory_history() -> None:
    """Keep a Python stack for every CUDA allocation from now on (for :func:`oom_report`; slows allocation)."""
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python")


def oom_report(error: BaseException, top: int = 30) -> str:
    """What held the GPU when ``error`` (an out-of-memory error) was raised: the full message, the allocator's summary
    and, when :func:`record_memory_history` ran, the live blocks grouped by pool and by the innermost sumtune,
    transformers, peft or bitsandbytes frame that allocated them, largest first."""
    lines = [str(error), torch.cuda.memory_summary(abbreviated=True)]
    snapshot = torch.cuda.memory._snapshot()
    groups: dict[tuple, list[int]] = {}
    pools: dict[tuple, list[int]] = {}
    for segment in snapshot.get("segments", []):
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        totals = pools.setdefault(pool, [0, 0])
        totals[0] += segment["total_size"]
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            totals[1] += block["size"]
            where = next((f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                          for f in block.get("frames", [])
                          if any(name in f["filename"] for name in ("sumtune", "transformers", "peft", "bitsandbytes"))),
                         "(no stack recorded)")
            entry = groups.setdefault((pool, where), [0, 0])
            entry[0] += block["size"]
            entry[1] += 1
    lines.append("pools (id: reserved GiB, allocated GiB): " + "; ".join(
        f"{pool}: {r / 2**30:.2f}, {a / 2**30:.2f}" for pool, (r, a) in sorted(pools.items())))
    for (pool, where), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / 2**30:8.2f} GiB {count:6d} blocks pool {pool} {where}")
    return "\n".join(lines)


def write_oom_report(directory: Path | None, setting: str, error: BaseException) -> None:
    """With ``directory`` (a benchmark's --oom-reports), :func:`oom_report` of ``error`` in
    DIRECTORY/oom-<setting>.txt; a failed report says so in the file rather than hiding the OOM."""
    if directory is None:
        return
    path = Path(directory) / f"oom-{re.sub(r'[^A-Za-z0-9_.-]', '_', setting)}.txt"
    try:
        text = oom_report(error)
    except Exception as report_error:  # noqa: BLE001 - the row's OOM note must survive a failed report
        text = f"{error}\n(report failed: {report_error!r})"
    path.write_text(text, encoding="utf-8")
    print(f"out-of-memory report: {path}", flush=True)


def add_oom_reports_option(parser) -> None:
    parser.add_argument("--oom-reports", type=Path, default=None,
                        help="record every CUDA allocation's stack; a setting that runs out of memory writes what held "
                             "the memory to DIR/oom-<setting>.txt")


def start_oom_reports(directory: Path | None, device: torch.device) -> None:
    if directory is not None and device.type == "cuda":
        Path(directory).mkdir(parents=True, exist_ok=True)
        record_memory_history()
