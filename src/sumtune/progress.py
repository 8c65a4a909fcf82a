"""Progress bars with rate and ETA for long steps, or plain log lines in quiet mode (CI, log files).

`Progress(enabled)` is handed around by the recipe:
- `bar(total, desc)`: a tqdm bar for a loop the caller drives (`update`, `set_postfix`, `close`);
- `iter(iterable, total, desc)`: iterate with a bar;
- `map_chunks(fn, items, desc)`: `fn` applied to chunks of `items`, results concatenated, with a bar;
- `task(desc, total=None)`: a named step; a bar when the work has a count (`with ... as bar: bar.update(n)`),
  otherwise an announcement and its duration;
- `write(message)`: a line that does not break the bars.
Quiet mode (`enabled=False`) draws no bars, also silencing the bars of transformers, datasets and the hub.
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


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        if not enabled:
            silence_library_bars()

    def bar(self, total: int | None, desc: str, initial: int = 0, unit: str = "step"):
        if not self.enabled:
            return _QuietBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, unit=unit, file=self.stream, dynamic_ncols=True)

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
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

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
