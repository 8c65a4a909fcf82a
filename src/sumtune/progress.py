"""Progress bars with rate and ETA on a terminal; plain log lines everywhere else (CI, Slurm, nohup, a pipe).

Bars are drawn only when `enabled` and the stream is a terminal (tqdm's own test, `disable=None`): a log file never
gets carriage-return lines. Training logs the same fields either way, once per logging window: on a terminal in
the bar's postfix, elsewhere as one line (`format_train_line`):
`step 40/240  epoch 0.67  loss 2.3141  lr 2.95e-03  grad_norm 1.02  tokens/s 18,210  MFU 31.2%  ETA 0:01:12`.

`Progress(enabled)` is handed around by the recipe:
- `bar(total, desc)`: a tqdm bar for a loop the caller drives (`update`, `set_postfix`, `close`);
- `iter(iterable, total, desc)`: iterate with a bar;
- `map_chunks(fn, items, desc)`: `fn` applied to chunks of `items`, results concatenated, with a bar;
- `task(desc, total=None)`: a named step; a bar when the work has a count (`with ... as bar: bar.update(n)`),
  otherwise an announcement and its duration;
- `write(message)`: a line that does not break the bars;
- `train_log(record, bar, total_steps, eta_s)`: a logging window's fields, in the bar or as a line.
Without bars (`enabled=False`, or no terminal) the bars of transformers, datasets and the hub are silenced too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _QuietBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def silence_library_bars() -> None:
    """Turn off the progress bars that transformers, datasets and huggingface_hub draw on their own.

    Libraries not imported yet read the environment when they are; those already imported are told directly
    (importing them here would cost seconds).
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers follows the hub's switch
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    for module, function in (("transformers.utils.logging", "disable_progress_bar"),
                             ("datasets.utils.logging", "disable_progress_bar"),
                             ("huggingface_hub.utils", "disable_progress_bars")):
        if module in sys.modules:
            getattr(sys.modules[module], function, lambda: None)()


def is_terminal(stream) -> bool:
    """tqdm's own test for `disable=None`: the stream has `isatty()` and it is true."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_log_fields(record: dict, total_steps: int, eta_s: float | None = None) -> dict[str, str]:
    """A training log record's fields as shown: step, epoch, loss, lr, grad_norm, tokens/s, MFU (on a GPU: against
    its datasheet peak, and in brackets against its measured matmul rate), new shapes (batch shapes captured in CUDA
    graphs in the window, when any, with their seconds), ETA (training steps only, from this window's step time less
    its new shapes' seconds: `eta_step_s`)."""
    fields = {"step": f"{record['step']}/{total_steps}", "epoch": f"{record.get('epoch', 0.0):.2f}",
              "loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
    if record.get("grad_norm") is not None:
        fields["grad_norm"] = f"{record['grad_norm']:.3g}"
    if record.get("tokens_per_s") is not None:
        fields["tokens/s"] = f"{record['tokens_per_s']:,.0f}"
    measured = (f" ({100 * record['mfu_measured']:.1f}% of measured)"
                if record.get("mfu_measured") is not None else "")
    if record.get("mfu") is not None:
        fields["MFU"] = f"{100 * record['mfu']:.1f}%{measured}"
    elif measured:
        fields["MFU"] = measured.strip(" ()")
    if record.get("graph_captures"):  # why this window is slower than the steady ones, and by how much
        fields["new shapes"] = f"{record['graph_captures']} ({new_shape_seconds(record):.1f} s)"
    if eta_s is not None:
        fields["ETA"] = format_duration(eta_s)
    return fields


def new_shape_seconds(record: dict) -> float:
    """Seconds a logging window spent warming up and capturing new batch shapes (0 without CUDA graphs)."""
    return (record.get("graph_warm_up_s") or 0.0) + (record.get("graph_record_s") or 0.0)


def eta_step_s(record: dict, window_steps: int) -> float:
    """Seconds a step for the ETA: the window's step time less the seconds its new batch shapes took (warm-up and
    capture), since a shape is captured once; without it a first epoch of whole bills showed 0:05:53 for a run
    that took under two minutes (H200, session 21)."""
    return max(record["step_time_s"] - new_shape_seconds(record) / max(window_steps, 1), 0.0)


def format_train_line(record: dict, total_steps: int, eta_s: float | None = None) -> str:
    """One plain log line per logging window (the fields of `train_log_fields`, two spaces apart)."""
    return "  ".join(f"{k} {v}" for k, v in train_log_fields(record, total_steps, eta_s).items())


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bars = enabled and is_terminal(self.stream)  # what tqdm's disable=None decides, known here too
        if not self.bars:
            silence_library_bars()

    def bar(self, total: int | None, desc: str, initial: int = 0, unit: str = "step"):
        if not self.enabled:
            return _QuietBar()
        from tqdm.auto import tqdm

        # disable=None: tqdm draws only on a terminal (what `self.bars` says)
        return tqdm(total=total, desc=desc, initial=initial, unit=unit, file=self.stream, dynamic_ncols=True,
                    disable=None)

    def iter(self, iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
        """Iterate `iterable` with a bar (rate, ETA when `total` or `len()` is known)."""
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        bar = self.bar(total=total, desc=desc, unit=unit)
        try:
            for item in iterable:
                yield item
                bar.update(1)
        finally:
            bar.close()

    def map_chunks(self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], desc: str,
                   chunk_size: int = 1000, unit: str = "doc") -> list[R]:
        """`fn(items)` computed chunk by chunk (for `fn` that maps each item on its own, e.g. tokenizing)."""
        out: list[R] = []
        with self.task(desc, total=len(items), unit=unit) as bar:
            for start in range(0, len(items), chunk_size):
                chunk = items[start:start + chunk_size]
                out.extend(fn(chunk))
                bar.update(len(chunk))
        return out

    def write(self, message: str) -> None:
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def train_log(self, record: dict, bar, total_steps: int, eta_s: float | None = None) -> None:
        """A logging window: in the bar's postfix on a terminal, else one line (`enabled=False` included: a
        quiet run still logs its loss)."""
        if self.bars:
            fields = train_log_fields(record, total_steps, eta_s)
            fields.pop("step")  # the bar shows it
            bar.set_postfix(fields, refresh=True)
        else:
            self.write(format_train_line(record, total_steps, eta_s))

    @contextlib.contextmanager
    def task(self, desc: str, total: int | None = None, unit: str = "it") -> Iterator:
        """A named step that takes a while. With a `total`, a bar the body advances with `update(n)`;
        without one, announced and then reported with its duration."""
        start = time.perf_counter()
        if total is not None:
            bar = self.bar(total=total, desc=desc, unit=unit)
            try:
                yield bar
            finally:
                bar.close()
            return
        if self.enabled:
            print(f"{desc} …", file=self.stream, flush=True)
        yield _QuietBar()
        if self.enabled:
            print(f"{desc}: done in {time.perf_counter() - start:.1f} s", file=self.stream, flush=True)
