"""Files a user keeps: written whole or not at all, read back with one sentence when damaged.

- `atomic_write_text` / `atomic_write_bytes` / `files_replaced_atomically`: a file is written under a hidden
  temporary name in its own directory, flushed to disk and renamed over the old one, so a crash or a kill at any
  moment leaves either the old file or the new one, never half of one.
- `safetensors_problem` / `check_safetensors`: what a truncated or overwritten `*.safetensors` file looks like,
  from its header and size alone (no tensor is read), so every command names the damaged file instead of
  failing with a SafetensorError traceback.
- `check_output_location`, `require_dir`, `require_file`: an output path that cannot be written, or an input path
  of the wrong kind, is refused in one sentence before any long work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator

from sumtune.errors import SumtuneError

# ---- atomic writes -------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (what a rename needs to survive a crash); quiet where refused."""
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and a rename (the old file stays until the new is whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def files_replaced_atomically(directory: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder inside `directory`; when the block succeeds, every file written into it
    replaces its namesake in `directory`, each by one rename. On failure nothing in `directory` changes.

    For writers that only take a directory (`save_pretrained`): `model.save_pretrained(tmp)` inside the block
    replaces the run's adapter files without the moment in which neither the old nor the new one exists.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".sumtune-writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = directory / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        fsync_path(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- damaged files -------------------------------------------------------------------------------------------

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def safetensors_problem(path: str | Path) -> str | None:
    """Why the safetensors file at `path` cannot be read whole (None when its header and size agree).

    The layout is an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then the
    data; a file cut short by a kill or a full disk, or overwritten with something else, fails one of the checks.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"it is {size} bytes long, too short for a safetensors header"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > SAFETENSORS_MAX_HEADER or 8 + header_len > size:
                return f"its header claims {header_len} bytes but the file has {size}"
            header = json.loads(fh.read(header_len).decode("utf-8"))
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    except (UnicodeDecodeError, ValueError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"its header entry for {name!r} is malformed"
        end = max(end, offsets[1])
    data = size - 8 - header_len
    if data != end:
        return f"its tensors need {end} bytes of data but the file holds {data} (cut short or overwritten)"
    return None


def check_safetensors(path: str | Path, what: str = "Weights file") -> None:
    """Refuse a damaged safetensors file in one sentence naming it."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise SumtuneError(f"{what} {str(path)!r} is damaged: {problem}.")


def check_safetensors_in(directory: str | Path, what: str = "Weights file") -> None:
    """Every `*.safetensors` file directly in `directory`, checked."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(path, what)


def check_json_file(path: str | Path, what: str = "File") -> None:
    """Refuse a JSON file that is cut short or not JSON (PEFT and transformers would raise a traceback)."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SumtuneError(f"{what} {str(path)!r} is damaged: it is not valid JSON.") from None
    except OSError as err:
        raise SumtuneError(f"Cannot read {str(path)!r}: {err.strerror or err}.") from None


# ---- paths of the right kind ----------------------------------------------------------------------------------

def kind_of(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken link"
    if path.is_dir():
        return "a directory"
    if path.is_file():
        return "a file"
    return "not a regular file or directory"


def _require(path: str | Path, what: str, is_kind, noun: str) -> Path:
    """`path` if `is_kind(path)`, else one sentence: it does not exist, or it is something else."""
    path = Path(path).expanduser()
    if is_kind(path):
        return path
    if os.path.lexists(path):
        raise SumtuneError(f"{what} {str(path)!r} is {kind_of(path)}, not {noun}.")
    raise SumtuneError(f"{what} {str(path)!r} does not exist.")


def require_dir(path: str | Path, what: str) -> Path:
    """`path` as a directory, or one sentence: it does not exist, or it is a file."""
    return _require(path, what, Path.is_dir, "a directory")


def require_file(path: str | Path, what: str) -> Path:
    """`path` as a file, or one sentence: it does not exist, or it is a directory (or another kind)."""
    return _require(path, what, Path.is_file, "a file")


def check_output_location(path: str | Path, what: str = "Output directory", *, is_file: bool = False) -> Path:
    """Refuse, before any long work, an output path that cannot be written: a file where a directory is wanted
    (or the reverse), a path under a file, or a directory this user may not write (read-only, no permission)."""
    if not str(path).strip():
        raise SumtuneError(f"{what} must not be empty (it would be the working directory).")
    path = Path(path).expanduser().absolute()
    if os.path.lexists(path):
        wrong = path.is_dir() if is_file else not path.is_dir()
        if wrong:
            raise SumtuneError(f"{what} {str(path)!r} exists and is {kind_of(path)}, not "
                               f"{'a file' if is_file else 'a directory'}.")
        probe = path.parent if is_file else path
        if not os.access(probe, os.W_OK | os.X_OK) or (is_file and not os.access(path, os.W_OK)):
            raise SumtuneError(f"{what} {str(path)!r} is not writable (read-only or no permission).")
        return path
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SumtuneError(f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is {kind_of(ancestor)}, "
                           f"not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SumtuneError(f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is not writable "
                           f"(read-only or no permission).")
    return path
