"""The run directory: which directories sumtune may write into, and one run at a time in each.

sumtune writes only into a directory that does not exist yet (it creates it), is empty, or holds a sumtune run
(continued with `--resume`, replaced with `--overwrite`). A directory holding anything else (a project folder,
a model, the working directory) is refused even with `--overwrite`: it is not sumtune's to replace.

Before anything is written, the run takes the directory's lock file `.sumtune.lock` (the owner's pid, host,
start time and command). The file is born already locked (`flock`, made under a temporary name and hard-linked
into place), so two runs started at the same moment cannot both own it; a second run is refused in one sentence
while the owner lives. The kernel drops the `flock` when the owner dies, however it dies (kill -9 included), so
the next run finds the lock stale and takes it over, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from sumtune.errors import SumtuneError

LOCK_FILE = ".sumtune.lock"
TRASH_PREFIX = ".sumtune-replaced-"
# Entries sumtune itself leaves in a run directory (a stale lock, the trash of an interrupted overwrite, a
# half-written file of a killed run): not the user's, so they neither make a directory "not empty" nor a run.
OWN_PREFIXES = (LOCK_FILE, TRASH_PREFIX, ".sumtune-writing-")
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "adapter_config.json", "checkpoints")
# What `--overwrite` replaces; anything else the user keeps in the directory is left alone.
RUN_ENTRIES = ("metrics.jsonl", "tb", "eval", "checkpoints", "profile", "plots", "base_model", "config.yaml",
               "adapter_config.json", "adapter_model.safetensors", "README.md", "report.html", "truncation.json")


def user_entries(path: Path) -> list[str]:
    """The names in directory `path`, without sumtune's own bookkeeping entries."""
    return sorted(n for n in os.listdir(path) if not n.startswith(OWN_PREFIXES))


def _run_config_keys(path: Path) -> set[str] | None:
    import yaml

    try:
        data = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return set(data) if isinstance(data, dict) else None


def holds_run(path: Path, *, count_lock: bool = True) -> bool:
    """Whether `path` is a directory written by `sumtune train` (or `demo`): its config.yaml is a sumtune config,
    it has a sumtune checkpoint, or a sumtune run was stopped in it before it wrote its config (a lock is left)."""
    if not path.is_dir():
        return False
    from sumtune.argparsing import field_types
    from sumtune.config import TrainConfig

    keys = _run_config_keys(path)
    if keys is not None and {"model", "dataset", "output_dir"} <= keys <= set(field_types(TrainConfig)):
        return True
    if any((step / "trainer_state.json").is_file() for step in (path / "checkpoints").glob("step-*")):
        return True
    return count_lock and (path / LOCK_FILE).is_file()


def check_output_dir(out: Path, *, overwrite: bool, resume: str | None, locked_by_us: bool = False,
                     took_over_stale: bool = False) -> None:
    """Refuse an output directory that would be clobbered, is another run's right now, or cannot be written;
    touches nothing. `locked_by_us`: the check again under this process's own lock (which marks a run only when
    it was a dead run's stale lock, taken over)."""
    from sumtune.checkpoint import latest_checkpoint
    from sumtune.safe_io import check_output_location

    check_output_location(out, "Output directory")
    if not out.is_dir():
        return  # sumtune creates it
    owner = None if locked_by_us else live_owner(out)
    if owner is not None:
        raise SumtuneError(in_use_message(out, owner))
    entries = user_entries(out)
    if not entries:
        return
    if not holds_run(out, count_lock=took_over_stale or not locked_by_us):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise SumtuneError(f"Output directory {str(out)!r} is not empty and holds no sumtune run (it has {shown}); "
                           f"sumtune writes only into a new or empty directory or its own run, so choose another "
                           f"--output-dir.")
    if not overwrite and resume is None:
        hint = " or --resume to continue it" if latest_checkpoint(out / "checkpoints") else ""
        raise SumtuneError(f"Output directory {str(out)!r} already holds a run; pass --overwrite to replace it"
                           f"{hint}, or choose another --output-dir.")


class _NoFlock(Exception):
    """This filesystem has no flock or no hard links."""


# ---- the lock --------------------------------------------------------------------------------------------------

def _read_owner(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def live_owner(directory: Path) -> dict | None:
    """The owner record of `directory`'s lock while its owner lives (None when unlocked or stale)."""
    import fcntl

    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_owner(path) or {"pid": None}
    except OSError:  # no flock on this filesystem: judge by the recorded pid (same host only)
        owner = _read_owner(path)
        same_host = owner.get("host") == socket.gethostname()
        return owner if not same_host or _pid_alive(owner.get("pid")) else None
    finally:
        os.close(fd)  # closing drops a shared lock we may have got
    return None


def in_use_message(directory: Path, owner: dict) -> str:
    started = owner.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" \
        if isinstance(started, (int, float)) else ""
    who = f"pid {owner.get('pid')} on {owner.get('host', 'an unknown host')}{since}" if owner.get("pid") else \
        "a process that is starting"
    return (f"Output directory {str(directory)!r} is in use by another sumtune run ({who}); wait for it to finish, "
            f"or choose another --output-dir.")


class RunDirLock:
    """The exclusive lock file of a run directory, held (flock) from `acquire()` to `release()`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "command": " ".join(sys.argv)[:300]}).encode("utf-8") + b"\n"

    def acquire(self) -> dict | None:
        """Take the lock; returns the record of a dead owner whose stale lock was taken over (else None)."""
        for _ in range(20):
            try:
                if self._create_locked():
                    return None
            except _NoFlock:  # a filesystem without flock or hard links: the recorded pid decides
                return self._acquire_by_pid()
            taken = self._take_over_stale()
            if taken is not None:
                return taken
        raise SumtuneError(f"Could not lock output directory {str(self.directory)!r}: its lock file keeps changing.")

    def _create_locked(self) -> bool:
        """Create the lock file already locked: written and flock'd under a temporary name, then hard-linked into
        place (which fails if a lock file exists). False when one exists."""
        import fcntl

        tmp = self.directory / f"{LOCK_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self._record())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EXDEV,
                                 errno.EMLINK, errno.ENOSYS):
                    raise _NoFlock from None
                raise
        except FileExistsError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self._fd = fd
        return True

    def _acquire_by_pid(self) -> dict | None:
        """The lock without flock: an exclusive create; a lock whose owner on this host is gone is replaced."""
        stale = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner(self.path)
            if not owner or owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid")):
                raise SumtuneError(in_use_message(self.directory, owner or {"pid": None})) from None
            stale = owner
            tmp = self.directory / f"{LOCK_FILE}.{os.getpid()}.tmp"
            tmp.write_bytes(self._record())
            os.replace(tmp, self.path)
            if _read_owner(self.path).get("pid") != os.getpid():  # another run replaced it at the same moment
                raise SumtuneError(in_use_message(self.directory, _read_owner(self.path) or {"pid": None})) from None
            fd = os.open(self.path, os.O_RDWR)
        else:
            os.write(fd, self._record())
        self._fd = fd
        return stale

    def _take_over_stale(self) -> dict | None:
        """Lock the existing lock file if its owner is gone; refuse while it lives; None to try again."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None  # released meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SumtuneError(in_use_message(self.directory, _read_owner(self.path) or {"pid": None})) from None
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                raise FileNotFoundError  # the owner released (unlinked) it while we waited: not the lock any more
        except FileNotFoundError:
            os.close(fd)
            return None
        stale = _read_owner(self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self._fd = fd
        return stale or {"pid": None}

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


# ---- claiming ---------------------------------------------------------------------------------------------

class RunDirClaim:
    """Lock the output directory, then create or take it over so that a setup that fails leaves it as it was.

    `acquire()` creates the directory if needed and takes its lock (checking the directory again under it);
    `begin()` moves an old run's entries into a hidden folder when overwriting; `commit()` deletes that folder,
    `rollback()` moves them back (and removes a directory this run created); `release()` unlocks, at the end.
    """

    def __init__(self, out: Path, *, overwrite: bool, resume: str | None = None):
        self.out = Path(out)
        self.overwrite = overwrite
        self.resume = resume
        self.existed = self.out.is_dir()
        self.before: set[str] = set()
        self.trash = self.out / f"{TRASH_PREFIX}{os.getpid()}"
        self.lock = RunDirLock(self.out)

    def acquire(self, notify: Callable[[str], None] | None = None) -> "RunDirClaim":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SumtuneError(f"Cannot create output directory {str(self.out)!r}: {err.strerror or err}.") from None
        self.existed = self.existed and self.out.is_dir()
        try:
            stale = self.lock.acquire()
        except OSError as err:
            raise SumtuneError(f"Cannot write to output directory {str(self.out)!r}: {err.strerror or err}.") from None
        try:
            check_output_dir(self.out, overwrite=self.overwrite, resume=self.resume, locked_by_us=True,
                             took_over_stale=stale is not None)  # again, now that no other run can change it
        except BaseException:
            self.rollback()
            raise
        self.before = set(os.listdir(self.out))
        if stale is not None and notify is not None:
            who = f"pid {stale.get('pid')} on {stale.get('host')}" if stale.get("pid") else "a run"
            notify(f"sumtune: the lock on {self.out} was left by {who}, which is no longer running; taking it over.")
        return self

    def begin(self) -> Path:
        from sumtune.checkpoint import recover_partials

        if self.overwrite and holds_run(self.out):
            self.trash.mkdir(exist_ok=True)
            for name in RUN_ENTRIES:
                if (self.out / name).exists():
                    os.rename(self.out / name, self.trash / name)
        for leftover in self.out.glob(".sumtune-writing-*"):  # a killed run's half-written files (never renamed)
            shutil.rmtree(leftover, ignore_errors=True)
        recover_partials(self.out / "checkpoints")
        return self.out

    def commit(self) -> None:
        shutil.rmtree(self.trash, ignore_errors=True)

    def rollback(self) -> None:
        """Put the directory back as it was; only the lock's owner touches it (never another run's directory)."""
        if not self.lock.held:
            return
        if not self.existed:
            self.lock.release()
            shutil.rmtree(self.out, ignore_errors=True)
            return
        keep = self.before | {self.trash.name, LOCK_FILE}
        for name in set(os.listdir(self.out)) - keep:
            path = self.out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if self.trash.is_dir():
            for entry in self.trash.iterdir():
                target = self.out / entry.name
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                os.rename(entry, target)
            self.trash.rmdir()
        self.lock.release()

    def release(self) -> None:
        self.lock.release()
