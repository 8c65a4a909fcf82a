"""How many batch shapes one epoch of real bills meets, and what each padding scheme costs (CPU, no model).

    python benchmarks/bucket_shapes.py                                   # 4096/512, micro-batch 4, 18,949 bills
    python benchmarks/bucket_shapes.py --src-len 1024 --tgt-len 128 --micro-batch 16 --tag b16

Why: with `cuda_graphs` every new (micro-batch, source width, target width) is run once eagerly and captured
before it replays, ~1.5 s each at 4096/512 on an H200 (`sumtune train` through the long config, session 21: 35 new
shapes in the first 20 steps of 160 real bills, 15 s a step-window of 4 against ~1.8 s once every shape was known).
A full epoch of the long config meets many more of them than a benchmark's few steps do. This study draws the
epoch's micro-batches with the product's own `epoch_batches` (group_by_length, as the config) from the lengths of
the real BillSum rows (T5 tokenizer; the 200 rows resampled to the size of BillSum's US train split), pads them
with each scheme, and estimates the epoch as padded FLOPs (`sumtune.flops`) at the measured rate plus captures at
`--capture-s` each. Padded FLOPs overstate the cost of padded keys (the attention kernels skip them), so the
estimate favours fine buckets slightly. The `fixed 128/32` scheme is the product's (`sumtune.batching.bucket_width`
with its SOURCE/TARGET_BUCKET_TOKENS); the others are candidates, measured here before any is built.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from sumtune.batching import SOURCE_BUCKET_TOKENS, TARGET_BUCKET_TOKENS, bucket_width, epoch_batches  # noqa: E402
from sumtune.flops import train_flops_per_sample  # noqa: E402
from sumtune.modeling import t5_config  # noqa: E402


def width_by_eighths(length: int, step: int, cap: int) -> int:
    """`length` rounded up to a multiple of `step`, doubled until it is at least 1/8 of the length (pad < 12.5%)."""
    while length > step * 8:
        step *= 2
    return bucket_width(length, step, cap)


def schemes(src_cap: int, tgt_cap: int) -> dict:
    return {
        f"fixed {SOURCE_BUCKET_TOKENS}/{TARGET_BUCKET_TOKENS} (sumtune now)": lambda s, t: (
            bucket_width(s, SOURCE_BUCKET_TOKENS, src_cap), bucket_width(t, TARGET_BUCKET_TOKENS, tgt_cap)),
        "fixed 256/64": lambda s, t: (bucket_width(s, 256, src_cap), bucket_width(t, 64, tgt_cap)),
        "eighths of the length": lambda s, t: (width_by_eighths(s, SOURCE_BUCKET_TOKENS, src_cap),
                                               width_by_eighths(t, TARGET_BUCKET_TOKENS, tgt_cap)),
        "eighths, targets 64": lambda s, t: (width_by_eighths(s, SOURCE_BUCKET_TOKENS, src_cap),
                                             bucket_width(t, 64, tgt_cap)),
        "targets at the cap": lambda s, t: (bucket_width(s, SOURCE_BUCKET_TOKENS, src_cap), tgt_cap),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src-len", type=int, default=4096)
    parser.add_argument("--tgt-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=18_949, help="documents in the epoch (BillSum US train)")
    parser.add_argument("--capture-s", type=float, default=1.5, help="seconds per new shape (measured, see above)")
    parser.add_argument("--tflops", type=float, default=329.0,
                        help="achieved TFLOP/s in steady steps (long config: 42%% of 783, session 21)")
    parser.add_argument("--lora-params", type=int, default=50_331_648, help="the shipped configs' LoRA size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="appended to the result's name (a second study of the same lengths)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    tokenizer = bc.load_t5_tokenizer()
    rows = bc.load_billsum_texts()
    source = [min(args.src_len, len(tokenizer("summarize: " + r["text"]).input_ids)) for r in rows]
    target = [min(args.tgt_len, len(tokenizer(r["summary"]).input_ids)) for r in rows]
    draw = random.Random(args.seed)
    picks = [draw.randrange(len(rows)) for _ in range(args.samples)]
    batches = epoch_batches([source[i] + target[i] for i in picks], args.micro_batch, seed=args.seed, epoch=0,
                            group_by_length=True)
    config = t5_config("t5-3b")
    out = []
    for name, width in schemes(args.src_len, args.tgt_len).items():
        shapes, real_tokens, padded_tokens, tflop, unpadded = set(), 0, 0, 0.0, 0
        for batch in batches:
            src_w, tgt_w = width(max(source[picks[i]] for i in batch), max(target[picks[i]] for i in batch))
            unpadded += all(source[picks[i]] == src_w for i in batch)  # no source mask needed (OMIT_FULL_SOURCE_MASK)
            shapes.add((len(batch), src_w, tgt_w))
            real_tokens += sum(source[picks[i]] + target[picks[i]] for i in batch)
            padded_tokens += len(batch) * (src_w + tgt_w)
            tflop += len(batch) * train_flops_per_sample(config, src_w, tgt_w, lora_params=args.lora_params) / 1e12
        compute_min = tflop / args.tflops / 60
        capture_min = len(shapes) * args.capture_s / 60
        out.append(dict(scheme=name, shapes=len(shapes), pad_share=round(1 - real_tokens / padded_tokens, 4),
                        padded_tflop=round(tflop), compute_min=round(compute_min, 2),
                        capture_min=round(capture_min, 2), epoch_min=round(compute_min + capture_min, 2),
                        unpadded_source_share=round(unpadded / len(batches), 3)))
    base = out[0]["epoch_min"]
    for row in out:
        row["vs_now"] = round(row["epoch_min"] / base, 3)
    bc.print_table(out, list(out[0]))
    if not args.no_save:
        path = bc.save_result(f"bucket_shapes_{args.src_len}_{args.tgt_len}" + (f"_{args.tag}" if args.tag else ""), {
            "what": "one epoch's batch shapes and padding per scheme, estimated epoch time (CPU study, no model)",
            "args": vars(args), "rows": out}, slug="cpu")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
