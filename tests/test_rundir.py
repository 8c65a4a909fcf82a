"""One run per directory, and only directories that are sumtune's (sumtune.rundir; real processes, real flock).

- a live owner's lock refuses a second run in one sentence naming its pid and host; a dead owner's (kill -9) is
  taken over, saying so;
- the lock file is born locked: of many processes racing for it, exactly one wins, every time;
- two real trainings started together into one directory: one runs, the other is refused, the run is whole;
- `demo` tells its own runs from others.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sumtune import cli, rundir
from sumtune.errors import SumtuneError
from sumtune.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
CORPUS = Path(__file__).parent / "bad_inputs"
TRAIN_ARGS = ["train", "--model", "tiny", "--dataset", str(CORPUS / "good.jsonl"), "--device", "cpu",
              "--compute-dtype", "fp32", "--no-progress", "--max-steps", "2", "--batch-size", "2",
              "--max-source-tokens", "16", "--max-target-tokens", "8", "--lora-r", "8", "--optimizer", "adamw",
              "--checkpoint-every-steps", "1", "--eval-max-samples", "2", "--max-new-tokens", "4",
              "--log-every-steps", "1", "--eval-ratio", "0.25"]

FORK = multiprocessing.get_context("fork")  # children start at once: sumtune is already imported


def _take_and_hold(directory: Path, start, results, stop) -> None:
    lock = rundir.RunDirLock(directory)
    start.wait()
    try:
        lock.acquire()
    except SumtuneError as err:
        results.put(("refused", str(err)))
        return
    results.put(("locked", os.getpid()))
    stop.wait(120)


def hold_lock(directory: Path, start=None, results=None, stop=None):
    """A process that takes `directory`'s lock once `start` is set and holds it until `stop` is set."""
    start, stop = start or FORK.Event(), stop or FORK.Event()
    results = results or FORK.Queue()
    proc = FORK.Process(target=_take_and_hold, args=(directory, start, results, stop))
    proc.start()
    start.set()
    proc.results, proc.stop = results, stop
    return proc


def wait_locked(proc) -> None:
    assert proc.results.get(timeout=60) == ("locked", proc.pid)


def test_a_live_owner_refuses_a_second_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    owner = hold_lock(out)
    try:
        wait_locked(owner)
        record = json.loads((out / rundir.LOCK_FILE).read_text())
        assert record["pid"] == owner.pid and record["host"] == socket.gethostname()
        with pytest.raises(SumtuneError, match=rf"is in use by another sumtune run \(pid {owner.pid} on "):
            rundir.RunDirClaim(out, overwrite=False).acquire()
        status = cli.main([*TRAIN_ARGS, "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert status == 2 and err.strip() == (
            f"sumtune: error: {rundir.in_use_message(out, record)}"), err
        assert sorted(os.listdir(out)) == [rundir.LOCK_FILE]  # the refused run wrote nothing
        assert json.loads((out / rundir.LOCK_FILE).read_text()) == record  # nor touched the owner's lock
    finally:
        owner.kill()
        owner.join()


def test_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    """kill -9 leaves the lock file; the kernel dropped its flock, so the next run takes over and says so."""
    out = tmp_path / "run"
    out.mkdir()
    owner = hold_lock(out)
    wait_locked(owner)
    os.kill(owner.pid, signal.SIGKILL)
    owner.join()
    assert (out / rundir.LOCK_FILE).is_file()
    assert rundir.live_owner(out) is None
    assert cli.main([*TRAIN_ARGS, "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"was left by pid {owner.pid} on {socket.gethostname()}, which is no longer running; taking it over." \
        in err
    assert not (out / rundir.LOCK_FILE).exists()  # released at the end of the run
    assert (out / "adapter_model.safetensors").is_file()


def test_exactly_one_of_many_racing_processes_gets_the_lock(tmp_path):
    """The lock file is made under a temporary name, locked, then hard-linked into place: no window in which a
    second process could find it unlocked. Eight processes released at the same instant, five times."""
    for round_ in range(5):
        out = tmp_path / f"round{round_}"
        out.mkdir()
        start, stop, results = FORK.Event(), FORK.Event(), FORK.Queue()
        procs = [FORK.Process(target=_take_and_hold, args=(out, start, results, stop)) for _ in range(8)]
        for proc in procs:
            proc.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in procs]  # the winner holds the lock until every one answered
        stop.set()
        for proc in procs:
            proc.join(timeout=60)
        assert sorted(kind for kind, _ in outcomes) == ["locked"] + ["refused"] * 7, outcomes
        assert all("is in use by another sumtune run" in text for kind, text in outcomes if kind == "refused")


def test_two_trainings_started_together(tmp_path):
    """Both start within the same second; one trains, the other is refused in one sentence, and the run directory
    holds one whole run (each step logged once, one set of checkpoints)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sumtune", *TRAIN_ARGS, "--output-dir", str(out)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    refused = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    last = refused.strip().splitlines()[-1]
    assert "Traceback" not in refused
    assert last.startswith("sumtune: error: Output directory") and (
        "is in use by another sumtune run" in last or "already holds a run" in last), refused
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step-1", "step-2"]
    assert not (out / rundir.LOCK_FILE).exists()


def test_setup_that_fails_releases_the_lock_and_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*TRAIN_ARGS, "--output-dir", str(out), "--lora-targets", "nope"]) == 2
    assert not out.exists()
    capsys.readouterr()


def test_demo_tells_its_runs_from_others(tmp_path):
    from sumtune.demo import demo_config, is_demo_run

    from sumtune import argparsing

    demo_run, other_run = tmp_path / "demo", tmp_path / "other"
    for path, cfg in ((demo_run, demo_config(str(demo_run), max_steps=7, progress=False)),
                      (other_run, demo_config(str(other_run)))):
        path.mkdir()
        argparsing.write_yaml(cfg, path / "config.yaml")
    assert is_demo_run(demo_run)  # another length, place or progress setting: still the demo
    text = (other_run / "config.yaml").read_text()
    (other_run / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.001"))
    assert not is_demo_run(other_run)  # trained with other settings: someone's run
    assert not is_demo_run(tmp_path / "nothing")


def test_without_flock_or_hard_links_the_recorded_pid_decides(tmp_path, monkeypatch):
    """Some network and FUSE filesystems have neither: the lock is then an exclusive create, and a lock whose
    owner on this host is gone (its pid no longer runs) is taken over."""
    import errno

    def no_hard_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted (no hard links here)")

    monkeypatch.setattr(os, "link", no_hard_links)
    out = tmp_path / "run"
    out.mkdir()
    first = rundir.RunDirLock(out)
    assert first.acquire() is None
    with pytest.raises(SumtuneError, match=rf"in use by another sumtune run \(pid {os.getpid()} on "):
        rundir.RunDirLock(out).acquire()
    first.release()
    assert not (out / rundir.LOCK_FILE).exists()
    dead = FORK.Process(target=os.getpid)
    dead.start()
    dead.join()  # a pid that ran and is gone
    (out / rundir.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    second = rundir.RunDirLock(out)
    assert second.acquire() == {"pid": dead.pid, "host": socket.gethostname()}
    assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()
