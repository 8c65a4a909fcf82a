"""Progress bars with rate and ETA for long steps, or plain log lines in quiet mode (CI, log files)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class _QuietBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def bar(self, total: int, desc: str, initial: int = 0, unit: str = "step"):
        if not self.enabled:
            return _QuietBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, unit=unit, file=self.stream, dynamic_ncols=True)

    def write(self, message: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def task(self, desc: str) -> Iterator[None]:
        """A named step that takes a while: announced, then reported with its duration."""
        start = time.perf_counter()
        if self.enabled:
            print(f"{desc} …", file=self.stream, flush=True)
        yield
        if self.enabled:
            print(f"{desc}: done in {time.perf_counter() - start:.1f} s", file=self.stream, flush=True)
