"""Resumable training state, written atomically and without pickle.

A checkpoint is a directory `RUN_DIR/checkpoints/step-N/` holding
- the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`): a usable adapter on its own;
- `optimizer.safetensors`: every tensor of the optimizer state (bitsandbytes 8-bit states, absmax, qmaps);
- `rng.safetensors`: torch CPU and per-GPU generator states;
- `trainer_state.json`: step, data position, best score, skipped steps, the resolved micro-batch, the length of
  metrics.jsonl at that step, the optimizer state's structure, Python/NumPy RNG states and the run's config.

Writes go to a hidden sibling directory that is renamed into place when complete, so a crash at any moment
leaves either the previous checkpoint or the new one, never half of one; hidden leftovers are cleaned up
by the next run. Nothing here unpickles: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sumtune.errors import SumtuneError
from sumtune.safe_io import files_replaced_atomically, fsync_path, safetensors_problem

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
# Keys that may differ on resume: they change where and how a run reports, not what it computes.
RESUME_FREE_KEYS = frozenset({
    "resume", "overwrite", "output_dir", "progress", "num_workers", "pin_memory", "allow_pickle",
    "max_nonfinite_steps", "profile_steps", "eval_batch_size", "keep_last_checkpoints", "checkpoint_every_steps",
    "compile", "cache_dequantized_weights",  # speed only: the same maths
})
PATH_KEYS = ("model", "tokenizer", "dataset", "eval_dataset")


@dataclass
class TrainerState:
    """The loop's own state at a step boundary (everything but tensors)."""

    step: int
    samples_seen: int
    micro_batch_size: int
    grad_accum_steps: int
    best_score: float | None = None
    best_step: int | None = None
    nonfinite_skipped: int = 0
    metrics_bytes: int = 0
    config: dict = field(default_factory=dict)
    ds_gemm_held_off: bool = False  # the micro-batch fit only with the attention's dQ kernel (sumtune.training)


# ---- atomic directories --------------------------------------------------------------------------------

def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(root)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `path`; when the block succeeds it replaces `path` by renames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)  # a crash between these two renames is repaired by `recover_partials`
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync_path(path.parent)


def recover_partials(root: Path) -> list[str]:
    """Remove half-written checkpoints (`.X.tmp-*`) and put back a `.X.old-*` whose replacement never landed."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        name = entry.name
        if not name.startswith(".") or not entry.is_dir():
            continue
        if ".tmp-" in name:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(name)
        elif ".old-" in name:
            target = root / name[1:].rsplit(".old-", 1)[0]
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.rename(entry, target)
    return removed


# ---- JSON encoding of nested state (dict keys of any type, tuples, tensors out of line) -----------------

def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able form of `obj`; tensors go to `tensors` under a dotted key (copied to the CPU)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {"T": prefix}
    if isinstance(obj, dict):
        return {"d": [[encode(k, tensors, f"{prefix}.k"), encode(v, tensors, f"{prefix}.{k}")]
                      for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"t": [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({prefix})")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "T" in obj:
            return tensors[obj["T"]]
        if "t" in obj:
            return tuple(decode(v, tensors) for v in obj["t"])
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["d"]}
    return obj


# ---- RNG ------------------------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    meta: dict[str, Any] = {"python": encode(random.getstate(), {}, "python")}
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, gauss = sys.modules["numpy"].random.get_state()
        meta["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        for key in cuda[: torch.cuda.device_count()]:
            torch.cuda.set_rng_state(tensors[key], int(key.rsplit("_", 1)[1]))
    random.setstate(decode(meta["python"], {}))
    if "numpy" in meta:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ---- save and load ------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, *, model, optimizer, state: TrainerState) -> Path:
    """Write the full training state to `path` atomically (see the module docstring for the layout)."""
    from safetensors.torch import save_file

    rng_tensors, rng_meta = capture_rng()  # first: nothing below may consume random numbers anyway
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_layout = encode(optimizer.state_dict(), optimizer_tensors, "optimizer")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng_tensors, str(tmp / RNG_FILE))
        record = {"format": FORMAT_VERSION, **asdict(state), "optimizer": optimizer_layout, "rng": rng_meta}
        (tmp / STATE_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
    return Path(path)


def read_state(path: Path) -> dict:
    """The trainer_state.json of a checkpoint directory, checked for completeness, format and damaged files."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        from sumtune.modeling import pickle_files

        pickled = pickle_files(path)
        hint = f" (it holds pickle files {', '.join(pickled)}, which sumtune does not load)" if pickled else ""
        raise SumtuneError(f"{str(path)!r} is not a sumtune checkpoint: {STATE_FILE} is missing{hint}.")
    try:
        record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SumtuneError(f"Checkpoint {str(path)!r} is damaged: {STATE_FILE} is not valid JSON.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        found = record.get("format") if isinstance(record, dict) else None
        raise SumtuneError(f"Checkpoint {str(path)!r} has format {found!r}; this sumtune reads "
                           f"format {FORMAT_VERSION}.")
    missing = [n for n in (ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE) if not (path / n).is_file()]
    if missing:
        raise SumtuneError(f"Checkpoint {str(path)!r} is incomplete: {', '.join(missing)} missing.")
    for name in (ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE):
        problem = safetensors_problem(path / name)
        if problem is not None:
            raise SumtuneError(f"Checkpoint {str(path)!r} is damaged: {name} is unreadable ({problem}).")
    return record


def trainer_state(record: dict) -> TrainerState:
    names = TrainerState.__dataclass_fields__
    return TrainerState(**{k: v for k, v in record.items() if k in names})


def load_adapter_weights(model, adapter_file: Path) -> None:
    """Load a saved adapter into the live PeftModel, refusing one that does not cover its trainable weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(adapter_file), device="cpu")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # size mismatch: another rank or model shape
        raise SumtuneError(f"The adapter in {str(adapter_file.parent)!r} does not fit this model "
                           f"({str(err).splitlines()[0][:160]}).") from None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        sample = (missing or list(result.unexpected_keys))[0]
        raise SumtuneError(f"The adapter in {str(adapter_file.parent)!r} does not fit this model: "
                           f"{len(missing)} trainable weight(s) missing and {len(result.unexpected_keys)} "
                           f"unexpected (e.g. {sample}).")


def repage_optimizer_state(optimizer) -> None:
    """bitsandbytes paged optimizers keep big states in unified memory; a loaded state_dict is plain GPU memory."""
    if not getattr(optimizer, "is_paged", False):
        return
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor) or param.device.type != "cuda":
            continue
        for key in ("state1", "state2"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape == param.shape and not getattr(value, "is_paged", False):
                buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
                buffer.copy_(value)
                state[key] = buffer


def load_checkpoint(path: Path, *, model, optimizer, restore_random: bool = True) -> TrainerState:
    """Put a checkpoint's adapter weights, optimizer state and RNG states back; returns the loop's state.

    Call it last in setup: the RNG states it restores are those of the step boundary it was saved at.
    """
    from safetensors.torch import load_file

    path = Path(path)
    record = read_state(path)
    load_adapter_weights(model, path / ADAPTER_FILE)
    tensors = load_file(str(path / OPTIMIZER_FILE), device="cpu")
    try:
        optimizer.load_state_dict(decode(record["optimizer"], tensors))
    except (ValueError, KeyError) as err:
        raise SumtuneError(f"The optimizer state in {str(path)!r} does not fit this run's optimizer ({err}).") from None
    repage_optimizer_state(optimizer)
    if restore_random:
        restore_rng(load_file(str(path / RNG_FILE), device="cpu"), record["rng"])
    return trainer_state(record)


# ---- finding, keeping and pruning checkpoints -----------------------------------------------------------

def step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def step_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` checkpoints under `root`, oldest first (hidden partial ones never match)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = step_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints (`best` is a separate directory and always stays)."""
    found = step_checkpoints(root)
    for old in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:  # checkpoint files are never modified in place, so sharing them is safe and costs no disk
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_checkpoint(src: Path, dst: Path, extra: dict | None = None) -> Path:
    """Atomically make `dst` (e.g. checkpoints/best) a copy of checkpoint `src`, plus a checkpoint.json."""
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        if extra:
            (tmp / "checkpoint.json").write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    return dst


def save_adapter(model, run_dir: Path) -> None:
    """The final adapter at the top of the run directory, each file replaced by a rename: the previous adapter
    stays readable until the new one is whole (PEFT's own README is dropped: sumtune writes the model card)."""
    with files_replaced_atomically(run_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)


# ---- resuming ------------------------------------------------------------------------------------------------

def newest_intact_checkpoint(root: Path, notify: Callable[[str], None] | None = None) -> Path | None:
    """The newest `step-N` under `root` that reads back whole; damaged or incomplete newer ones are skipped, and
    each skip is told to `notify` with its reason. None when there is no checkpoint at all."""
    candidates = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    skipped: list[str] = []
    for path in sorted(candidates, key=step_of, reverse=True):
        try:
            read_state(path)
        except SumtuneError as err:
            skipped.append(f"{path.name} ({str(err).rstrip('.')})")
            continue
        for reason in skipped if notify is not None else ():
            notify(f"sumtune: skipped checkpoint {reason}; resuming from the newest intact one, {path.name}.")
        return path
    if skipped:
        raise SumtuneError(f"Nothing to resume: none of the {len(skipped)} checkpoint(s) in {str(root)!r} is intact "
                           f"(newest: {skipped[0]}); start the run again with --overwrite.")
    return None


def find_resume_checkpoint(resume: str, out: Path, notify: Callable[[str], None] | None = None) -> Path:
    """The checkpoint `resume` names (`latest` = the newest intact one in `out`); it must belong to the run in `out`.

    A named checkpoint must be whole; for `latest` or a run directory, damaged newer checkpoints are skipped.
    """
    if resume == "latest":
        found = newest_intact_checkpoint(out / "checkpoints", notify)
        if found is None:
            raise SumtuneError(f"Nothing to resume: {str(out)!r} has no checkpoint (checkpoints/step-N); "
                               f"run without --resume to start it.")
        return found
    path = Path(resume).expanduser().resolve()
    if not path.exists():
        raise SumtuneError(f"Resume path {str(path)!r} does not exist.")
    if not path.is_dir():
        raise SumtuneError(f"Resume path {str(path)!r} is a file, not a checkpoint or run directory.")
    if (path / STATE_FILE).is_file():
        read_state(path)  # a named checkpoint must be whole: one sentence naming what is damaged
        found = path
    elif (path / "checkpoints").is_dir():
        found = newest_intact_checkpoint(path / "checkpoints", notify)
        if found is None:
            raise SumtuneError(f"Nothing to resume: run directory {str(path)!r} has no checkpoint.")
    else:
        read_state(path)  # raises the "not a sumtune checkpoint" sentence
        raise AssertionError("unreachable")
    run_dir = found.parent.parent
    if run_dir.resolve() != out.resolve():
        raise SumtuneError(f"Checkpoint {str(found)!r} belongs to the run in {str(run_dir)!r}, but output_dir is "
                           f"{str(out)!r}; pass --output-dir {str(run_dir)!r} to continue that run.")
    return found


def normalized_config(values: dict) -> dict:
    """The config as JSON values, with local paths resolved (a resume from another cwd is the same run)."""
    out = json.loads(json.dumps(values))
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key` was A, now B, for every setting that changes what the run computes."""
    now = normalized_config(current)
    return [f"`{key}` was {saved[key]!r}, now {now[key]!r}" for key in sorted(saved)
            if key in now and key not in RESUME_FREE_KEYS and saved[key] != now[key]]


def check_resume_config(checkpoint: Path, current: dict) -> dict:
    """The checkpoint's record; refuses a resume whose config differs from the run's in what it computes."""
    record = read_state(checkpoint)
    changes = config_changes(record.get("config", {}), current)
    if changes:
        raise SumtuneError(f"Cannot resume from {str(checkpoint)!r} because the config changed: "
                           f"{'; '.join(changes)} (resume with the run's own config, or start a new run in "
                           f"another --output-dir).")
    return record
