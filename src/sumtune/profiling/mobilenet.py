"""The original tuning study: MobileNetV2 on CIFAR10-shaped images resized to 224 px.

Six cumulative stages, each measured with `StepProfiler`: base (fp32, batch 32) -> automatic mixed
precision -> batch 128 -> normalize on the GPU (copy uint8) -> 2 data-loading workers -> pinned memory
with non_blocking copies. The input pipeline is the PIL one torchvision's `Resize(224)`, `ToTensor()`,
`Normalize()` run (bilinear PIL resize, HWC uint8 -> CHW float / 255), written out here so it works and
is testable without torchvision; only the model comes from torchvision (imported lazily).
"""

from __future__ import annotations

import gc
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sumtune.errors import SumtuneError
from sumtune.profiling.profiler import GIB, StepProfiler, write_json

STAGES = ("base", "amp", "batch128", "gpu_normalize", "workers2", "pinned")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10

# Published numbers (Quadro RTX 4000); GPU memory was only reported for the first three stages.
PUBLISHED = {
    "base": {"step_ms": 117.1, "gpu_gb": 2.51, "samples_per_s": 273.5, "vs_base_pct": 100.0},
    "amp": {"step_ms": 81.1, "gpu_gb": 1.32, "samples_per_s": 395.1, "vs_base_pct": 144.0},
    "batch128": {"step_ms": 232.1, "gpu_gb": 4.95, "samples_per_s": 551.5, "vs_base_pct": 201.0},
    "gpu_normalize": {"step_ms": 202.6, "gpu_gb": None, "samples_per_s": 631.6, "vs_base_pct": 230.0},
    "workers2": {"step_ms": 145.8, "gpu_gb": None, "samples_per_s": 877.8, "vs_base_pct": 320.0},
    "pinned": {"step_ms": 92.6, "gpu_gb": None, "samples_per_s": 1381.6, "vs_base_pct": 505.0},
}


@dataclass(frozen=True)
class StageConfig:
    """The training settings of one stage (each stage keeps every change of the stages before it)."""

    name: str
    batch_size: int = 32
    amp: bool = False
    gpu_normalize: bool = False
    num_workers: int = 0
    pin_memory: bool = False  # also means .to(device, non_blocking=True)


def stage_configs() -> list[StageConfig]:
    """The six cumulative stages in order."""
    base = StageConfig("base")
    amp = replace(base, name="amp", amp=True)
    big = replace(amp, name="batch128", batch_size=128)
    gpu_norm = replace(big, name="gpu_normalize", gpu_normalize=True)
    workers = replace(gpu_norm, name="workers2", num_workers=2)
    pinned = replace(workers, name="pinned", pin_memory=True)
    return [base, amp, big, gpu_norm, workers, pinned]


def select_stages(names: list[str] | None) -> list[StageConfig]:
    if not names:
        return stage_configs()
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise SumtuneError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}.")
    return [s for s in stage_configs() if s.name in names]


# -- data ------------------------------------------------------------------------------------------
def synthesize_cifar10(num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR10-shaped random images (N, 32, 32, 3) uint8 and labels (N,) int64, reproducible by seed."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num_images, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, NUM_CLASSES, size=num_images, dtype=np.int64)


CIFAR10_RECORD_BYTES = 1 + 32 * 32 * 3  # the binary version: a label byte, then 1024 R, 1024 G, 1024 B bytes


def cifar10_files(root: str | Path, allow_pickle: bool = False) -> tuple[str, list[Path]]:
    """("binary" | "pickle", the training batch files) of a local CIFAR10 copy; nothing is read yet.

    The binary version (`cifar-10-batches-bin/data_batch_*.bin`) is plain bytes and always safe. The Python
    version (`cifar-10-batches-py/data_batch_*`) is pickle, which runs whatever code the file names when it is
    loaded: it is read only with `allow_pickle` (`--allow-pickle`).
    """
    root = Path(root)
    for name in ("cifar-10-batches-bin", "."):
        files = sorted((root / name).glob("data_batch_*.bin"))
        if files:
            return "binary", files
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    files = sorted(p for p in folder.glob("data_batch_*") if p.suffix != ".bin")
    if not files:
        raise SumtuneError(f"No CIFAR10 batches (data_batch_*.bin or data_batch_*) found in {str(root)!r}.")
    if not allow_pickle:
        raise SumtuneError(f"The CIFAR10 batches in {str(folder)!r} are Python pickle files ({files[0].name}, ...), "
                           f"which can run code when loaded; use the binary version (cifar-10-batches-bin), or pass "
                           f"--allow-pickle if you trust their source.")
    return "pickle", files


def read_cifar10_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise SumtuneError(f"CIFAR10 batch {str(path)!r} is damaged: {raw.size} bytes is not a whole number of "
                           f"{CIFAR10_RECORD_BYTES}-byte records.")
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    return records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), records[:, 0].astype(np.int64)


def load_cifar10(root: str | Path, allow_pickle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Training images (N, 32, 32, 3) uint8 and labels from a local CIFAR10 copy (see `cifar10_files`)."""
    kind, files = cifar10_files(root, allow_pickle)
    images, labels = [], []
    for path in files:
        if kind == "binary":
            batch_images, batch_labels = read_cifar10_binary(path)
            images.append(batch_images)
            labels.append(batch_labels)
            continue
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # only with allow_pickle (cifar10_files refuses otherwise)
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def resize_pil(image_hwc: np.ndarray, size: int):
    """torchvision `Resize(size)` on a square PIL image: bilinear PIL resize."""
    from PIL import Image

    return Image.fromarray(image_hwc).resize((size, size), Image.BILINEAR)


def pil_to_uint8_tensor(img) -> torch.Tensor:
    """HWC PIL image -> CHW uint8 tensor (torchvision `PILToTensor`)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def to_float_normalized(chw_uint8: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """`ToTensor()` then `Normalize(mean, std)`; works on CPU tensors and on (N, C, H, W) GPU batches."""
    x = chw_uint8.float().div_(255.0)
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, device=x.device).view(shape)
    std_t = torch.tensor(std, device=x.device).view(shape)
    return x.sub_(mean_t).div_(std_t)


class CifarLikeDataset(Dataset):
    """32x32 uint8 images -> resized tensors, normalized on the host (float) or left uint8 for the GPU."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, image_size: int = 224,
                 normalize_on_host: bool = True, length: int | None = None) -> None:
        self.images, self.labels = images, labels
        self.image_size, self.normalize_on_host = image_size, normalize_on_host
        self.length = length or len(images)  # > len(images) cycles, so a short study never runs dry

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = index % len(self.images)
        x = pil_to_uint8_tensor(resize_pil(self.images[i], self.image_size))
        return (to_float_normalized(x) if self.normalize_on_host else x), int(self.labels[i])


def make_loader(stage: StageConfig, images, labels, *, image_size: int, num_batches: int, device: str, seed: int = 0):
    ds = CifarLikeDataset(images, labels, image_size=image_size, normalize_on_host=not stage.gpu_normalize,
                          length=num_batches * stage.batch_size)
    return DataLoader(ds, batch_size=stage.batch_size, shuffle=True, drop_last=True, num_workers=stage.num_workers,
                      pin_memory=stage.pin_memory and device == "cuda",
                      generator=torch.Generator().manual_seed(seed))


# -- training --------------------------------------------------------------------------------------
def mobilenet_v2(num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError as err:
        raise SumtuneError("the mobilenet-cifar10 workload needs torchvision (pip install torchvision matching your torch).") from err
    return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)


def run_stage(stage: StageConfig, images, labels, *, out_dir: Path, device: str, image_size: int,
              wait: int, warmup: int, active: int, model_fn: Callable[[], torch.nn.Module],
              record_shapes: bool = True, profile_memory: bool = True, with_stack: bool = False) -> dict[str, Any]:
    """Train `wait + warmup + active` steps of one stage under `StepProfiler`; return its summary."""
    torch.manual_seed(0)
    model = model_fn().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # fp16 + loss scaling on CUDA as in the original study; CPU autocast only supports bf16.
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if stage.amp and device == "cuda" else None
    non_blocking = stage.pin_memory and device == "cuda"
    total = wait + warmup + active
    loader = make_loader(stage, images, labels, image_size=image_size, num_batches=total, device=device)
    batches = iter(loader)  # starts the workers before the clock runs
    context = {"batch_size": stage.batch_size, "num_workers": stage.num_workers, "pin_memory": stage.pin_memory,
               "compute_dtype": "fp16" if stage.amp else "fp32", "gradient_checkpointing": False}
    prof = StepProfiler(out_dir, wait=wait, warmup=warmup, active=active, device=device,
                        record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack,
                        samples_per_step=stage.batch_size, context=context)
    with prof:
        for _ in range(total):
            with prof.phase("data"):
                x, y = next(batches)
            with prof.phase("h2d"):
                x, y = x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)
            with prof.phase("forward"):
                if stage.gpu_normalize:  # uint8 crossed the bus; finish ToTensor/Normalize on the device
                    x = to_float_normalized(x)
                with torch.autocast(device_type=device, dtype=amp_dtype, enabled=stage.amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
            with prof.phase("backward"):
                (scaler.scale(loss) if scaler else loss).backward()
            with prof.phase("optimizer"):
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            prof.step()
    summary = prof.write_summary(out_dir / "summary.json")
    del batches, loader, model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return summary


def stage_row(stage: StageConfig, summary: dict[str, Any], base_samples_per_s: float | None) -> dict[str, Any]:
    """One table row: our numbers for the stage next to the published ones."""
    sps = summary.get("samples_per_s")
    return {
        "stage": stage.name,
        "batch_size": stage.batch_size,
        "mem_gb": summary.get("peak_mem_gib") and summary["peak_mem_gib"] * GIB / 1e9,  # published "GB" is 1e9 bytes
        "step_ms": summary.get("step_time_mean_s") and 1e3 * summary["step_time_mean_s"],
        "step_median_ms": summary.get("step_time_median_s") and 1e3 * summary["step_time_median_s"],
        "samples_per_s": sps,
        "vs_base_pct": 100.0 * sps / base_samples_per_s if sps and base_samples_per_s else None,
        "breakdown_pct": summary.get("breakdown_pct"),
        "gpu_utilization_pct": (summary.get("gpu") or {}).get("utilization_pct"),
        "tensor_core_pct": (summary.get("gpu") or {}).get("tensor_core_pct"),
        "advice": summary.get("advice"),
        "config": asdict(stage),
        "published": PUBLISHED[stage.name],
    }


def run_study(*, out_dir: str | Path, stages: list[str] | None = None, device: str | None = None,
              image_size: int = 224, wait: int = 1, warmup: int = 2, active: int = 10,
              cifar10_dir: str | None = None, model_fn: Callable[[], torch.nn.Module] | None = None,
              record_shapes: bool = True, profile_memory: bool = True, with_stack: bool = False,
              echo: Callable[[str], None] | None = print, allow_pickle: bool = False) -> dict[str, Any]:
    """Run the selected stages in order; return {"stages": [rows], ...} (the caller saves the JSON)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = select_stages(stages)
    if cifar10_dir:
        cifar10_files(cifar10_dir, allow_pickle)  # refuse pickle batches before anything else
    if model_fn is None:
        mobilenet_v2()  # fail before any data work when torchvision is missing
        model_fn = mobilenet_v2
    total = wait + warmup + active
    if cifar10_dir:
        images, labels = load_cifar10(cifar10_dir, allow_pickle)
        source = f"CIFAR10 from {cifar10_dir}"
    else:
        images, labels = synthesize_cifar10(min(total * max(s.batch_size for s in chosen), 50_000), seed=0)
        source = "synthetic CIFAR10-shaped uint8 images (seed 0)"
    out_dir = Path(out_dir)
    rows, base_sps = [], None
    for stage in chosen:
        if echo:
            echo(f"stage {stage.name}: batch {stage.batch_size}, amp={stage.amp}, gpu_normalize={stage.gpu_normalize}, "
                 f"workers={stage.num_workers}, pinned={stage.pin_memory}")
        summary = run_stage(stage, images, labels, out_dir=out_dir / stage.name, device=device, image_size=image_size,
                            wait=wait, warmup=warmup, active=active, model_fn=model_fn, record_shapes=record_shapes,
                            profile_memory=profile_memory, with_stack=with_stack)
        if stage.name == "base":
            base_sps = summary.get("samples_per_s")
        rows.append(stage_row(stage, summary, base_sps))
    return {
        "workload": "mobilenet-cifar10",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch_version": torch.__version__,
        "image_size": image_size,
        "data": source,
        "schedule": {"wait": wait, "warmup": warmup, "active": active},
        "stages": rows,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m sumtune.profiling.mobilenet --out DIR`: the study without the sumtune CLI."""
    import argparse

    from sumtune.profiling.report import format_study_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (traces per stage + study.json)")
    parser.add_argument("--stages", nargs="*", default=None, choices=STAGES)
    parser.add_argument("--wait", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--active", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cifar10-dir", default=None)
    parser.add_argument("--allow-pickle", action="store_true", help="read the Python (pickle) CIFAR10 batches")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    result = run_study(out_dir=args.out, stages=args.stages, device=args.device, image_size=args.image_size,
                       wait=args.wait, warmup=args.warmup, active=args.active, cifar10_dir=args.cifar10_dir,
                       allow_pickle=args.allow_pickle)
    print(format_study_table(result))
    write_json(result, Path(args.out) / "study.json")


if __name__ == "__main__":
    main()
