"""`train_throughput.py --numerics`: the fast T5 path's loss and LoRA gradients against stock transformers (SDPA and
eager attention) and a float32 recomputation, then a loss curve of the product's TrainStep on each path.

T5 widths with few layers (`--layers`), NF4 base with LoRA on every linear (small random B, as after training), T5's
dropout off so the paths compute the same maths. Writes benchmarks/results/fast_t5_numerics-<date>-<gpu>.json.
"""

from __future__ import annotations

import statistics
import time

import torch

import bench_common as bc


def build_numerics_model(config, device, seed: int = 0):
    """NF4 base as from_pretrained makes it, LoRA on every linear with small random B (as after training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = bc.quantize_linear4bit(bc.random_t5(config, torch.bfloat16, device), skip=("lm_head", "wo"))
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
    return model.train()


def loss_and_grads(model, batch, device):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_attn_implementation(model, name: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def loss_curve(model, data, device, args) -> tuple[list[float], float]:
    """`curve_steps` steps of the product's TrainStep (bf16 autocast, clip 1.0) with a deterministic AdamW."""
    from sumtune.train_step import TrainStep

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.curve_lr)  # deterministic, same for both paths
    step = TrainStep(model, optimizer, device=device, compute_dtype="bf16", max_grad_norm=1.0)
    losses = []
    bc.sync(device)
    start = time.perf_counter()
    for index in range(args.curve_steps):
        losses.append(step([bc.batch_at(data, index, args.numerics_batch)], lr=args.curve_lr).loss)
    bc.sync(device)
    return losses, time.perf_counter() - start


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def fast_path_name(variant: str, first: bool) -> str:
    """`fast` for the first (primary) variant, `fast_<tokens>` for the others (their keys in draws and summaries)."""
    return "fast" if first else "fast_" + (variant.replace(":", "_") or "default")


def all_paths(model, batch, device, variants=("",)):
    """Loss and LoRA gradients of stock SDPA, stock eager, the fast path under each variant (PATCH_TOKENS strings,
    '' = the code's defaults; {name: (loss, grads)}, the first named `fast`) and the float32 recomputation."""
    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.numerics import fp32_reference_grads

    stock_loss, stock_grads = loss_and_grads(model, batch, device)
    set_attn_implementation(model, "eager")
    _, eager_grads = loss_and_grads(model, batch, device)
    set_attn_implementation(model, "sdpa")
    fast = {}
    enable_fast_t5(model)
    for index, variant in enumerate(variants):
        with bc.patched(variant):  # the kernels read these module constants at call time
            fast[fast_path_name(variant, index == 0)] = loss_and_grads(model, batch, device)
    disable_fast_t5(model)
    fp32_loss, fp32_grads = fp32_reference_grads(model, batch)
    return stock_loss, stock_grads, eager_grads, fast, fp32_loss, fp32_grads


def errors_vs_fp32(fast: dict, stock: dict, eager: dict, fp32: dict) -> dict:
    """One draw's record: each path's whole LoRA-gradient vector error against float32 (every fast variant first)."""
    from sumtune.fast_t5.numerics import vector_relative_error

    return dict(**{f"{name}_vs_fp32": vector_relative_error(grads, fp32) for name, (_, grads) in fast.items()},
                stock_sdpa_vs_fp32=vector_relative_error(stock, fp32),
                stock_eager_vs_fp32=vector_relative_error(eager, fp32))


def one_more_draw(config, data, device, args, seed: int) -> dict:
    """Another model (seed) and batch: one draw of inputs says little when the paths differ by ~2%."""
    model = build_numerics_model(config, device, seed)
    batch = {k: v.to(device) for k, v in bc.batch_at(data, seed, args.numerics_batch).items()}  # batch_at wraps
    _, stock, eager, fast, _, fp32 = all_paths(model, batch, device, args.numerics_variants)
    draw = dict(seed=seed, batch_index=seed, **errors_vs_fp32(fast, stock, eager, fp32))
    print(f"draw {seed} (batch {seed}): " + ", ".join(f"{k} {v:.3e}" for k, v in draw.items() if k.endswith("fp32")),
          flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return draw


def summarize_draws(draws: list[dict]) -> dict:
    """Mean of each path's whole-vector error against float32, and in how many draws each fast path is the closer."""
    paths = [key[:-len("_vs_fp32")] for key in draws[0] if key.endswith("_vs_fp32")]
    means = {f"mean_{p}_vs_fp32": statistics.fmean(d[f"{p}_vs_fp32"] for d in draws) for p in paths}
    closer = {}
    for fast in (p for p in paths if p.startswith("fast")):
        closer[f"{fast}_closer_than_sdpa"] = sum(d[f"{fast}_vs_fp32"] <= d["stock_sdpa_vs_fp32"] for d in draws)
        closer[f"{fast}_closer_than_eager"] = sum(d[f"{fast}_vs_fp32"] <= d["stock_eager_vs_fp32"] for d in draws)
    return dict(draws=len(draws), **means, **closer)


def run_numerics(args, device) -> None:
    from sumtune.fast_t5 import disable_fast_t5, enable_fast_t5
    from sumtune.fast_t5.numerics import relative_errors, vector_relative_error

    layers = args.layers or (2 if args.quick else 4)
    config = bc.t5_config(args.model, num_layers=layers, dropout_rate=0.0)  # no dropout: same RNG-free math
    data = bc.tokenize_rows(bc.load_t5_tokenizer(), bc.load_billsum_texts(), args.src_len, args.tgt_len)
    model = build_numerics_model(config, device)
    batch = {k: v.to(device) for k, v in bc.batch_at(data, 0, args.numerics_batch).items()}
    stock_loss, stock_grads, eager_grads, fast, fp32_loss, fp32_grads = all_paths(model, batch, device,
                                                                                 args.numerics_variants)
    fast_loss, fast_grads = fast["fast"]
    errors, floor = relative_errors(fast_grads, stock_grads), relative_errors(eager_grads, stock_grads)
    worst = max(errors, key=errors.get)
    vs_fp32 = {path: relative_errors(grads, fp32_grads) for path, grads in
               (("fast", fast_grads), ("stock_sdpa", stock_grads), ("stock_eager", eager_grads))}
    draw = errors_vs_fp32(fast, stock_grads, eager_grads, fp32_grads)
    global_errors = dict(fast_vs_stock=vector_relative_error(fast_grads, stock_grads),
                         eager_vs_stock=vector_relative_error(eager_grads, stock_grads),
                         **{k: draw[k] for k in ("fast_vs_fp32", "stock_sdpa_vs_fp32", "stock_eager_vs_fp32")})
    print(f"{args.model} widths, {layers}+{layers} layers, batch {args.numerics_batch} at {args.src_len}/{args.tgt_len}")
    print(f"loss stock {stock_loss:.6f} fast {fast_loss:.6f} rel diff {abs(fast_loss - stock_loss) / abs(stock_loss):.2e}")
    print(f"LoRA grad rel err fast vs stock: max {errors[worst]:.3e} ({worst}), median "
          f"{statistics.median(errors.values()):.3e} over {len(errors)} tensors")
    print(f"noise floor, stock eager vs stock sdpa: max {max(floor.values()):.3e}, median "
          f"{statistics.median(floor.values()):.3e}", flush=True)
    print(f"fp32 reference loss {fp32_loss:.6f}; LoRA grad rel err against it (max / median):")
    for path, errs in vs_fp32.items():
        print(f"  {path:12s} {max(errs.values()):.3e} / {statistics.median(errs.values()):.3e}")
    worse = sum(vs_fp32["fast"][n] > max(vs_fp32["stock_sdpa"][n], vs_fp32["stock_eager"][n]) for n in errors)
    print(f"tensors where fast is further from fp32 than both stock backends: {worse} of {len(errors)}")
    print("all LoRA grads as one vector: " + ", ".join(f"{k} {v:.3e}" for k, v in global_errors.items()), flush=True)
    others = {f"{name}_vs_fp32": draw[f"{name}_vs_fp32"] for name in fast if name != "fast"}
    if others:
        print("other fast variants, all LoRA grads as one vector: "
              + ", ".join(f"{k} {v:.3e}" for k, v in others.items()), flush=True)
    draws = [dict(seed=0, batch_index=0, **draw)]
    del stock_grads, eager_grads, fast_grads, fp32_grads, fast
    for seed in range(1, args.numerics_draws):
        draws.append(one_more_draw(config, data, device, args, seed))
    if len(draws) > 1:
        draws_summary = summarize_draws(draws)
        print(f"over {len(draws)} draws (model seed, batch): "
              + ", ".join(f"{k} {v}" for k, v in draws_summary.items()))
    else:
        draws_summary = {}

    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    curves, seconds = {}, {}
    for path in ("stock", "fast"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
        if path == "fast":
            enable_fast_t5(model)
        with bc.patched(args.numerics_variants[0] if path == "fast" else ""):  # the primary fast variant
            curves[path], seconds[path] = loss_curve(model, data, device, args)
        disable_fast_t5(model)
        print(f"{path}: {args.curve_steps} steps in {seconds[path]:.1f} s, loss {curves[path][0]:.4f} -> "
              f"{curves[path][-1]:.4f}", flush=True)
    window = max(1, min(20, args.curve_steps // 10))
    smooth_stock, smooth_fast = smooth(curves["stock"], window), smooth(curves["fast"], window)
    deviation = max(abs(f - s) / abs(s) for f, s in zip(smooth_fast, smooth_stock))
    print(f"loss curves ({window}-step moving average): max relative deviation fast vs stock {deviation:.3e}")
    if not args.no_save:
        payload = dict(model=args.model, variants=list(args.numerics_variants), layers=layers,
                       batch=args.numerics_batch, src_len=args.src_len, tgt_len=args.tgt_len, stock_loss=stock_loss,
                       fast_loss=fast_loss,
                       grad_rel_err_max=errors[worst], grad_rel_err_worst=worst,
                       grad_rel_err_median=statistics.median(errors.values()),
                       eager_vs_sdpa_rel_err_max=max(floor.values()), fp32_loss=fp32_loss,
                       grad_rel_err_vs_fp32_max={k: max(v.values()) for k, v in vs_fp32.items()},
                       grad_rel_err_vs_fp32_median={k: statistics.median(v.values()) for k, v in vs_fp32.items()},
                       tensors_fast_worse_than_both_stock=worse, global_grad_rel_err=global_errors,
                       draws=draws, draws_summary=draws_summary, curve_steps=args.curve_steps,
                       curve_lr=args.curve_lr, curve_window=window, curve_max_rel_deviation=deviation,
                       curve_seconds=seconds, curves=curves)
        name = "fast_t5_numerics" + ("-quick" if args.quick else "")
        print(f"saved {bc.save_result(name, payload)}")
