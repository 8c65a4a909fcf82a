"""Where greedy summarization time goes: encoder vs decoder loop, and the top CUDA kernels of the encoder and of
decode steps.

    python benchmarks/generate_profile.py --batches 256,512        # GPU, t5-3b shapes, random bf16 weights
    python benchmarks/generate_profile.py --quick                  # CPU plumbing check
    python benchmarks/generate_profile.py --source-tokens 4096 --new-tokens 512 --full-length --attention fused \
        --no-stock-encoder                                         # issue 14: every input 4096 tokens

Times, for each batch size, on real BillSum inputs padded as `generate_ids` pads them: the encoder with
stock transformers forwards and with sumtune's fast T5 forwards, then the decoder loop alone (forced
`--new-tokens`), then prints a torch.profiler table of a few eager decode steps; the kernel breakdowns (ms by family,
the largest kernels) of one encoder pass and of those decode steps are saved. Writes JSON under
benchmarks/results/ with the GPU name.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import kernel_table  # noqa: E402

PAD, EOS, START = 0, 1, 0


def timed(fn, device, repeat: int = 1) -> float:
    fn()  # warm-up (cuBLAS handles, graph capture, autotuning)
    bc.sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    bc.sync(device)
    return (time.perf_counter() - start) / repeat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-3b")
    parser.add_argument("--batches", default="256")
    parser.add_argument("--source-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--encoder-chunks", default="16,64")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--attention", default="hidden",
                        help="comma-separated decoder attention modes of sumtune.generation.t5_decode to time (kv is "
                             "timed too at batches up to 128)")
    parser.add_argument("--full-length", action="store_true",
                        help="consecutive BillSum texts joined until every input fills --source-tokens")
    parser.add_argument("--no-stock-encoder", action="store_true", help="skip the stock transformers encoder timing")
    parser.add_argument("--encoder-settings", default="",
                        help="also time the fast encoder under these comma-separated bench_common patch tokens "
                             "(e.g. pvnograd), each in the same run as the shipped setting")
    parser.add_argument("--fused-tiles", default="", help="also time the fused decode loop at other " + bc.FUSED_TILES_HELP)
    parser.add_argument("--tag", default="", help="appended to the result file's name (runs of one day apart)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batches, args.source_tokens, args.new_tokens, args.encoder_chunks = "tiny", "4", 64, 8, "2"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")

    from generate_throughput import load_inputs

    from sumtune.batching import pad_batch
    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.generation.decoding import encode
    from sumtune.generation.greedy import GreedySession
    from sumtune.generation.t5_decode import DecoderWeights, decode_step

    model = bc.random_t5(bc.t5_config(args.model, dropout_rate=0.0), torch.bfloat16, device).eval()
    tokenizer = bc.load_t5_tokenizer()
    batches = [int(b) for b in args.batches.split(",")]
    chunks = [int(c) for c in args.encoder_chunks.split(",")]
    inputs = load_inputs(tokenizer, args.source_tokens, max(batches), args.full_length)
    modes = args.attention.split(",")
    weights = DecoderWeights.from_model(model)
    results = []
    print(f"{bc.gpu_name()}: {args.model}, {args.source_tokens} -> {args.new_tokens}", flush=True)
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch(sorted(inputs[:batch], key=len, reverse=True), PAD, 64)
            ids, mask = ids.to(device), mask.to(device)
            result = dict(batch=batch, src_len=ids.shape[1])
            for chunk in chunks:
                if batch == batches[0] and not args.no_stock_encoder:  # stock once: it is the slow one
                    result[f"encoder_stock_chunk{chunk}_s"] = timed(lambda: encode(model, ids, mask, chunk), device)
                enable_fast_t5(model.encoder)
                result[f"encoder_fast_chunk{chunk}_s"] = timed(lambda: encode(model, ids, mask, chunk), device)
                for setting in filter(None, args.encoder_settings.split(",")):
                    with bc.patched(setting):
                        result[f"encoder_fast_chunk{chunk}_{setting}_s"] = timed(
                            lambda: encode(model, ids, mask, chunk), device)
                disable_fast_t5(model.encoder)
            enable_fast_t5(model.encoder)
            encoder_out = encode(model, ids, mask, chunks[0])
            # where the fast encoder's time goes (attention against the GEMMs): one pass under the profiler
            result["encoder_fast_kernels"], _ = kernel_table.profiled(lambda: encode(model, ids, mask, chunks[0]), 1,
                                                                      device)
            disable_fast_t5(model.encoder)
            tiles = [f"fused@{'x'.join(map(str, spec))}" for spec in bc.parse_fused_tiles(args.fused_tiles)]
            for attention in modes + (["kv"] if batch <= 128 and "kv" not in modes else []) + tiles:
                mode, _, spec = attention.partition("@")  # "fused@32x4x16x2": the fused mode at other tiles
                with bc.fused_tiles(spec or None):
                    t0 = time.perf_counter()
                    session = GreedySession(weights, batch=batch, src_len=ids.shape[1],
                                            max_new_tokens=args.new_tokens, attention=mode, pad_token_id=PAD,
                                            eos_token_id=EOS, use_cuda_graphs=device.type == "cuda")
                    bc.sync(device)
                    result[f"session_setup_{attention}_s"] = time.perf_counter() - t0
                    result[f"decode_{attention}_s"] = timed(lambda: session.run(
                        encoder_out, mask, decoder_start_token_id=START, min_new_tokens=args.new_tokens), device)
                if mode != "kv" and not spec:  # on a CPU (--quick) the same path, with no kernels to count
                    state = session.state

                    def eager_step():
                        state.step.fill_(min(100, args.new_tokens - 1))
                        decode_step(weights, state, args.new_tokens, PAD, EOS)

                    result[f"decode_{attention}_eager_step_kernels"], prof = kernel_table.profiled(
                        eager_step, args.profile_steps, device)
                    print(f"batch {batch}, {attention}: {args.profile_steps} eager decode steps at kv_len {args.new_tokens}")
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                    max_name_column_width=90), flush=True)
                del session
            encoder_s = min(result[f"encoder_fast_chunk{chunk}_s"] for chunk in chunks)
            result["mean_source_tokens"] = float(mask.sum()) / batch
            for attention in modes + tiles:
                result[f"summaries_per_s_fast_encoder_{attention}"] = batch / (encoder_s + result[f"decode_{attention}_s"])
            results.append(result)
            print(result, flush=True)
    if not args.quick:
        print(f"saved {bc.save_result('generate_profile', dict(model=args.model, new_tokens=args.new_tokens, full_length=args.full_length, rows=results), slug=bc.gpu_slug() + (f'-{args.tag}' if args.tag else ''))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
