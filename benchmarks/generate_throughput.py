"""Summarization generation throughput: transformers `generate` on a stock QLoRA training model (reference) vs
sumtune's path (a QLoRA model built by `sumtune.training.build_model`, its dense copy made by the product's
`inference_copy`, decoded by `sumtune.generation.generate_ids` in CUDA graphs), on real BillSum inputs tokenized
by the product (`sumtune.data.tokenize_sources`).

    python benchmarks/generate_throughput.py                      # GPU: t5-3b shapes, random weights
    python benchmarks/generate_throughput.py --fast-batches 64,128,256 --beam-batch 16 --compile
    python benchmarks/generate_throughput.py --quick              # CPU plumbing check, tiny model

Random weights produce eos at random, so every throughput row forces exactly `--new-tokens` new tokens
(min_new_tokens = max_new_tokens) in both paths. Token agreement with transformers `generate` on the same
merged bf16 weights is measured separately on a subset, next to transformers' agreement with itself at
another batch size (the bf16 noise floor: batch shape changes kernels and so rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402

LORA = dict(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=["v", "o"], modules_to_save=["lm_head"],
            task_type="SEQ_2_SEQ_LM")
PAD, EOS, START = 0, 1, 0
COLUMNS = ["path", "setting", "batch", "beams", "inputs", "summaries_per_s", "new_tokens_per_s", "wall_s",
           "peak_mem_gib", "speedup", "note"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-3b", help="T5 shape (bench_common.T5_SHAPES)")
    parser.add_argument("--source-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reference-batches", default="4,32")
    parser.add_argument("--fast-batches", default="64,128,256")
    parser.add_argument("--beam-batch", type=int, default=16, help="inputs per batch for num_beams=4")
    parser.add_argument("--beam-inputs", type=int, default=32)
    parser.add_argument("--ngram-batch", type=int, default=32,
                        help="inputs per batch for greedy with no_repeat_ngram_size=3 (transformers' generate on "
                             "sumtune's encoder output: key/value caches, so a reference-sized batch)")
    parser.add_argument("--agreement-inputs", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd step + CUDA graphs")
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU: plumbing only, numbers meaningless")
    parser.add_argument("--full-length", action="store_true",
                        help="join consecutive BillSum texts so every input fills --source-tokens (default: real "
                             "documents cut there, of varied length)")
    parser.add_argument("--ab-slicing", action="store_true",
                        help="also time each greedy batch with slice_cross_attention=False (every row reads the "
                             "batch's padded width in cross-attention)")
    parser.add_argument("--slicing", default="",
                        help="also time each greedy batch with other row slices of the cross-attention, as "
                             "comma-separated GROUPS/MULTIPLE pairs (e.g. 16/128,8/64; shipped: 8/256)")
    parser.add_argument("--fused", action="store_true",
                        help="also time each greedy batch with attention='fused' (sumtune's one-read cross-attention "
                             "kernel) and check its tokens")
    parser.add_argument("--hidden", action="store_true",
                        help="also time each greedy batch with attention='hidden' (the encoder's states cached once, "
                             "not each layer's keys and values: FLAN-T5-XL's 'auto' picks kv)")
    parser.add_argument("--fused-tiles", default="",
                        help="also time each greedy batch with attention='fused' at other kernel tiles, and check "
                             f"their tokens: {bc.FUSED_TILES_HELP}")
    parser.add_argument("--patches", default="",
                        help="also time each greedy batch under these settings (in the default attention mode),"
                             " comma-separated strings of bench_common.PATCH_TOKENS joined by ':' (e.g. pvnograd)")
    parser.add_argument("--greedy-only", action="store_true",
                        help="only the greedy graphs rows and greedy token agreement (no eager/kv/beam/n-gram rows): "
                             "larger batches on a short device budget")
    parser.add_argument("--timed-batches", type=int, default=2,
                        help="batches of sumtune's greedy rows timed after the warm-up batch (1 halves a large "
                             "batch's run on a short device budget)")
    parser.add_argument("--agreement-first", action="store_true",
                        help="with --greedy-only: the token check before the timed rows (printed at once), so a run "
                             "cut by a time limit still has it")
    parser.add_argument("--warm-all", action="store_true",
                        help="warm up on every timed input, not one batch of them (each batch shape met before the "
                             "timing: steady state, as a repeated evaluation sees it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.source_tokens, args.new_tokens = "tiny", 64, 8
        args.reference_batches, args.fast_batches, args.beam_batch = "2", "4,8", 2
        args.beam_inputs, args.agreement_inputs, args.ngram_batch = 4, 8, 2
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------- setup
def build_training_model(config, device: torch.device):
    """The reference recipe's model, built stock: NF4 + double quant (bf16 compute), wo unquantized, PEFT LoRA on
    v,o with lm_head in modules_to_save; LoRA B set to small random values so the merge matters."""
    from peft import LoraConfig, get_peft_model

    model = bc.random_t5(config, dtype=torch.bfloat16, device=device)
    model = bc.quantize_linear4bit(model, torch.bfloat16, "nf4", True, skip=("lm_head", "wo"), device=device)
    model = get_peft_model(model, LoraConfig(**LORA))
    return randomize_lora_b(model).eval()


def build_sumtune_model(args, tokenizer, device: torch.device):
    """The same LoRA on sumtune's own QLoRA build (what `sumtune train` trains), LoRA B random as above."""
    from sumtune.config import TrainConfig
    from sumtune.training import build_model

    cfg = TrainConfig(model="tiny" if args.model == "tiny" else f"random:{args.model}", model_dropout=0.0,
                      compute_dtype="bf16", lora_r=LORA["r"], lora_alpha=float(LORA["lora_alpha"]),
                      lora_dropout=LORA["lora_dropout"], lora_targets=list(LORA["target_modules"]),
                      modules_to_save=list(LORA["modules_to_save"]), seed=0)
    return randomize_lora_b(build_model(cfg, tokenizer, device)).eval()


def randomize_lora_b(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    return model


def load_inputs(tokenizer, source_tokens: int, count: int, full_length: bool = False) -> list[list[int]]:
    """Real BillSum texts cut at `source_tokens`; `full_length`: consecutive texts joined until each fills it."""
    from sumtune.data import tokenize_sources

    rows = bc.load_billsum_texts()
    texts = []
    for i in range(count):
        parts = [rows[i % len(rows)]["text"]]
        while full_length and sum(map(len, parts)) < 8 * source_tokens:  # ~4-5 characters a token
            parts.append(rows[(i + len(parts)) % len(rows)]["text"])
        texts.append("\n\n".join(parts))
    return tokenize_sources(tokenizer, texts, "summarize: ", source_tokens)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- runners
def hf_generate(model, inputs: list[list[int]], batch_size: int, new_tokens: int, device, num_beams: int = 1,
                forced: bool = True, **options) -> list[list[int]]:
    """transformers generate in input order, right-padded batches; rows trimmed like sumtune's output."""
    from sumtune.batching import pad_batch
    from sumtune.generation.greedy import trim_rows

    results = []
    for start in range(0, len(inputs), batch_size):
        ids, mask = (t.to(device) for t in pad_batch(inputs[start:start + batch_size], PAD))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens if forced else None,
                                 decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS, **options)
        results += trim_rows(out[:, 1:].tolist(), EOS)
    return results


def fast_generate(model, inputs, batch_size, new_tokens, num_beams=1, forced=True, **kwargs):
    from sumtune.generation import generate_ids

    return generate_ids(model, inputs, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens if forced else 0,
                        num_beams=num_beams, batch_size=batch_size, **kwargs)


def release_generation_cache(model) -> None:
    from sumtune.generation import release_generation_cache as release

    release(model)


def timed(fn, device) -> tuple[list[list[int]], float, float | None]:
    bc.free_gpu_memory()
    bc.sync(device)
    start = time.perf_counter()
    out = fn()
    bc.sync(device)
    return out, time.perf_counter() - start, peak_gib(device)


def row(path, setting, batch, beams, outputs, wall_s, peak) -> dict:
    new_tokens = sum(len(o) for o in outputs)
    return dict(path=path, setting=setting, batch=batch, beams=beams, inputs=len(outputs),
                summaries_per_s=len(outputs) / wall_s, new_tokens_per_s=new_tokens / wall_s, wall_s=wall_s,
                peak_mem_gib=peak)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of identical sequences, and share of tokens before each sequence's first difference."""
    same_prefix = sum(next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), min(len(r), len(s)))
                      for r, s in zip(a, b))
    return dict(sequences=sum(r == s for r, s in zip(a, b)) / len(a), tokens=same_prefix / sum(map(len, b)))


# ----------------------------------------------------------------------------- main
def cross_slicing(groups: int | None, multiple: int | None):
    """The decoder's row slices for cross-attention set to `groups` slices rounded to `multiple` tokens for the
    duration (None: as shipped)."""
    from sumtune.generation import t5_decode

    if groups is None:
        return contextlib.nullcontext()
    return mock.patch.multiple(t5_decode, CROSS_GROUPS=groups, CROSS_GROUP_MULTIPLE=multiple)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("generate_throughput.py measures GPU generation and needs a CUDA GPU; use --quick for a CPU "
              "plumbing check.", file=sys.stderr)
        return 2
    from sumtune.generation.summaries import inference_copy

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        torch.set_num_threads(1)
    config = bc.t5_config(args.model, dropout_rate=0.0)
    tokenizer = bc.load_t5_tokenizer()
    reference_batches, fast_batches = ints(args.reference_batches), ints(args.fast_batches)
    timed_batches = args.timed_batches = max(1, args.timed_batches)  # the count run is the one the JSON records
    n_inputs = max([2 * b for b in reference_batches] + [timed_batches * b for b in fast_batches]
                   + [args.beam_inputs, args.agreement_inputs])
    inputs = load_inputs(tokenizer, args.source_tokens, n_inputs, args.full_length)
    mean_len = sum(map(len, inputs)) / len(inputs)
    print(f"{bc.gpu_name()}: {args.model}, {len(inputs)} BillSum inputs (mean {mean_len:.0f} tokens), "
          f"{args.new_tokens} new tokens", flush=True)

    t0 = time.perf_counter()
    training = build_training_model(config, device)
    build_s = time.perf_counter() - t0
    rows: list[dict] = []
    PARTIAL.update(model=args.model, source_tokens=args.source_tokens, new_tokens=args.new_tokens,
                   full_length=args.full_length, timed_batches=args.timed_batches, rows=rows,
                   saved=args.quick)  # a quick run saves nothing, cut or not

    # Reference: generate on the NF4 + LoRA PeftModel. Warm-up with 2 tokens, then batches of real length.
    for batch in reference_batches:
        hf_generate(training, inputs[:batch], batch, 2, device)
        count = batch if batch >= 32 else 2 * batch
        out, wall, peak = timed(lambda: hf_generate(training, inputs[:count], batch, args.new_tokens, device), device)
        rows.append(row("reference", "PeftModel.generate nf4", batch, 1, out, wall, peak))
        print(rows[-1], flush=True)

    del training
    bc.free_gpu_memory()
    t0 = time.perf_counter()
    training = build_sumtune_model(args, tokenizer, device)
    build_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = inference_copy(training)  # bf16 on the GPU, fp32 on the CPU, as evaluation and `summarize` make it
    bc.sync(device)
    prepare_s = time.perf_counter() - t0
    merged_gib = sum(p.numel() * p.element_size() for p in {id(p): p for p in merged.parameters()}.values()) / 2**30

    use_graphs = device.type == "cuda"
    settings = [("graphs" if use_graphs else "eager", dict(use_cuda_graphs=use_graphs))]
    if args.fused:
        settings.append((settings[0][0] + ", fused cross-attention",
                         dict(use_cuda_graphs=use_graphs, attention="fused")))
    if args.hidden:
        settings.append((settings[0][0] + ", hidden", dict(use_cuda_graphs=use_graphs, attention="hidden")))
    if args.ab_slicing:
        settings.append((settings[0][0] + ", unsliced cross-attention",
                         dict(use_cuda_graphs=use_graphs, slice_cross_attention=False)))
    slicings = [(None, None)] + [tuple(int(v) for v in pair.split("/")) for pair in args.slicing.split(",") if pair]
    settings = [(name + (f", {g} slices of {m}" if g else ""), kwargs, (g, m), None, "")
                for g, m in slicings for name, kwargs in (settings if g is None else settings[:1])]
    tile_specs = [spec for spec in args.fused_tiles.split(",") if spec]
    fused = dict(use_cuda_graphs=use_graphs, attention="fused")
    settings += [(settings[0][0] + f", fused cross-attention {spec}", fused, (None, None), spec, "")
                 for spec in tile_specs]
    patches = bc.patch_strings(args.patches)
    # each --patches setting in the default mode (what "auto" picks: the fused kernel for T5-3b's long sources, the
    # kv cache for FLAN-T5-XL's), so that its row and the default row differ by the patch alone
    settings += [(settings[0][0] + f", {patch}", settings[0][1], (None, None), None, patch) for patch in patches]
    agree = None
    if args.greedy_only and args.agreement_first:
        agree = greedy_agreement(merged, inputs[: args.agreement_inputs], max(fast_batches), args.new_tokens, device,
                                 use_graphs, args.fused, tile_specs, patches)
        print(f"agreement: {agree}", flush=True)
        PARTIAL["agreement"] = agree
    for batch in fast_batches:
        first_out = None
        for name, kwargs, slicing, spec, patch in settings:
            release_generation_cache(merged)  # a cached session would replay graphs captured with other tiles
            try:
                with cross_slicing(*slicing), bc.fused_tiles(spec), bc.patched(patch):
                    warm = inputs[:timed_batches * batch] if args.warm_all else inputs[:batch]
                    fast_generate(merged, warm, batch, args.new_tokens, **kwargs)  # warm-up: capture, cuBLAS plans
                    out, wall, peak = timed(lambda: fast_generate(merged, inputs[:timed_batches * batch], batch,
                                                                  args.new_tokens, **kwargs), device)
                rows.append(row("sumtune", f"greedy {name}", batch, 1, out, wall, peak))
                first_out = first_out if first_out is not None else out  # the batch's first mode: what others match
                rows[-1]["tokens_equal_first_row"] = out == first_out
            except torch.OutOfMemoryError as error:  # one mode's caches at a batch another mode's fit (kv vs hidden)
                release_generation_cache(merged)
                bc.free_gpu_memory()
                rows.append(dict(path="sumtune", setting=f"greedy {name}", batch=batch,
                                 note=f"OutOfMemoryError: {error}"[:120]))
            print(rows[-1], flush=True)
    best = max((r for r in rows if r["path"] == "sumtune" and "summaries_per_s" in r),
               key=lambda r: r["summaries_per_s"])["batch"]
    if args.greedy_only:
        if agree is None and args.agreement_inputs:  # 0: timing only, no transformers comparison
            agree = greedy_agreement(merged, inputs[: args.agreement_inputs], best, args.new_tokens, device,
                                     use_graphs, args.fused, tile_specs, patches)
        return finish(args, rows, agree, best, mean_len, build_s, prepare_s, merged_gib)
    variants = [("eager", dict(use_cuda_graphs=False)),
                ("kv-cache" + (" graphs" if use_graphs else ""), dict(attention="kv", use_cuda_graphs=use_graphs))]
    if args.compile:
        variants.append(("compile+graphs", dict(compile_step=True, use_cuda_graphs=use_graphs)))
    for name, kwargs in variants:
        try:
            fast_generate(merged, inputs[:best], best, args.new_tokens, **kwargs)
            out, wall, peak = timed(lambda: fast_generate(merged, inputs[:2 * best], best, args.new_tokens,
                                                          **kwargs), device)
            rows.append(row("sumtune", f"greedy {name}", best, 1, out, wall, peak))
        except Exception as error:  # noqa: BLE001 - e.g. kv caches OOM at a large batch, a compile failure
            rows.append(dict(path="sumtune", setting=f"greedy {name}", batch=best,
                             note=f"{type(error).__name__}: {error}"[:120]))
            bc.free_gpu_memory()
        print(rows[-1], flush=True)

    beam_inputs = inputs[: args.beam_inputs]
    fast_generate(merged, beam_inputs[: args.beam_batch], args.beam_batch, 2, num_beams=4)
    out, wall, peak = timed(lambda: fast_generate(merged, beam_inputs, args.beam_batch, args.new_tokens,
                                                  num_beams=4), device)
    rows.append(row("sumtune", "beam4 (transformers beam search, cached encoder)", args.beam_batch, 4, out, wall,
                    peak))
    print(rows[-1], flush=True)

    # An option sumtune's decoder lacks (the n-gram ban): that call runs transformers' generate on the encoder
    # output sumtune computed. Timed as such, next to the reference, so nobody takes it for the fast path.
    fast_generate(merged, beam_inputs[: args.ngram_batch], args.ngram_batch, 2, no_repeat_ngram_size=3)
    out, wall, peak = timed(lambda: fast_generate(merged, beam_inputs, args.ngram_batch, args.new_tokens,
                                                  no_repeat_ngram_size=3), device)
    rows.append(row("sumtune", "greedy no_repeat_ngram_size=3 (transformers generate, cached encoder)",
                    args.ngram_batch, 1, out, wall, peak))
    print(rows[-1], flush=True)

    agree = greedy_agreement(merged, inputs[: args.agreement_inputs], best, args.new_tokens, device, use_graphs,
                             args.fused)
    beam_ref = hf_generate(merged, beam_inputs[:8], 8, args.new_tokens, device, num_beams=4)
    beam_ours = fast_generate(merged, beam_inputs[:8], 8, args.new_tokens, num_beams=4)
    agree["sumtune_beam4_vs_transformers_beam4"] = agreement(beam_ours, beam_ref)
    ngram_ref = hf_generate(merged, beam_inputs[:8], 8, args.new_tokens, device, no_repeat_ngram_size=3)
    ngram_ours = fast_generate(merged, beam_inputs[:8], 8, args.new_tokens, no_repeat_ngram_size=3)
    agree["sumtune_ngram3_vs_transformers_ngram3"] = agreement(ngram_ours, ngram_ref)

    return finish(args, rows, agree, best, mean_len, build_s, prepare_s, merged_gib)


def greedy_agreement(merged, subset, best, new_tokens, device, use_graphs, fused=False, tile_specs=(),
                     patches=()) -> dict:
    """Greedy tokens of sumtune ("hidden", "kv", and "fused" if asked or wherever its kernel runs: "auto" takes it
    for long sources, so the timed rows run it) against transformers `generate` on the same merged bf16 weights
    (forced length), next to transformers against itself at another batch size (the bf16 noise floor)."""
    from sumtune.generation import cross_attention

    hf_big = hf_generate(merged, subset, 32, new_tokens, device)
    hf_small = hf_generate(merged, subset, 8, new_tokens, device)
    agree = {"transformers_b32_vs_b8": agreement(hf_small, hf_big)}
    fused = fused or cross_attention.kernel_available(torch.zeros(1, 64, device=device)) is None
    for mode in ("hidden", "kv") + (("fused",) if fused else ()):
        ours = fast_generate(merged, subset, min(best, len(subset)), new_tokens, attention=mode,
                             use_cuda_graphs=use_graphs)
        agree[f"sumtune_{mode}_vs_transformers_b32"] = agreement(ours, hf_big)
    # the fused mode at each --fused-tiles spec and the default mode under each --patches setting, as their rows
    settings = [("fused", spec, lambda s=spec: bc.fused_tiles(s)) for spec in tile_specs]
    settings += [("auto", patch, lambda p=patch: bc.patched(p)) for patch in patches]
    for mode, label, setting in settings:
        release_generation_cache(merged)
        with setting():
            ours = fast_generate(merged, subset, min(best, len(subset)), new_tokens, attention=mode,
                                 use_cuda_graphs=use_graphs)
        agree[f"sumtune_{mode}_{label}_vs_transformers_b32"] = agreement(ours, hf_big)
    release_generation_cache(merged)
    return agree


def finish(args, rows, agree, best, mean_len, build_s, prepare_s, merged_gib) -> int:
    """Speedups against the first reference row (else the first sumtune row), the table, and the saved JSON."""
    timed_rows = [r for r in rows if r.get("summaries_per_s")]  # not the rows that ran out of memory
    baseline = next((r for r in timed_rows if r["path"] == "reference"), timed_rows[0])
    for r in rows:
        if r.get("summaries_per_s"):
            r["speedup"] = r["summaries_per_s"] / baseline["summaries_per_s"]
    print()
    bc.print_table(rows, COLUMNS)
    if agree:
        print(f"\nagreement (greedy, forced {args.new_tokens} tokens, {args.agreement_inputs} inputs):")
    for key, value in (agree or {}).items():
        print(f"  {key}: sequences {value['sequences']:.3f}, tokens {value['tokens']:.3f}")
    print(f"build {build_s:.1f} s (both models), inference_copy {prepare_s:.1f} s, merged model {merged_gib:.2f} GiB")
    if args.quick:
        print("quick mode: plumbing check only, nothing saved")
        return 0
    path = bc.save_result("generate_throughput", dict(
        model=args.model, source_tokens=args.source_tokens, new_tokens=args.new_tokens, quick=args.quick,
        mean_source_tokens=mean_len, full_length=args.full_length, lora=LORA, rows=rows, agreement=agree,
        timed_batches=args.timed_batches, build_s=build_s,
        prepare_inference_model_s=prepare_s, merged_model_gib=merged_gib, best_fast_batch=best))
    PARTIAL["saved"] = True
    print(f"saved {path}")
    return 0


# What a run has measured so far, saved if a signal cuts it (bench_common.saved_if_interrupted)
PARTIAL: dict = {}

if __name__ == "__main__":
    with bc.saved_if_interrupted("generate_throughput", PARTIAL):
        sys.exit(main())
