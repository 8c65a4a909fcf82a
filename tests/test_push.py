"""`sumtune push`: what goes up, and that every way it cannot work ends in one clear sentence.

No test reaches the real hub: offline mode, a closed port and a local HTTP server that refuses the token stand
for the three ways a push fails here (switched off, unreachable, refused), each through real huggingface_hub.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sumtune.errors import SumtuneError
from sumtune.push import files_to_push, push_run

OFFLINE_MESSAGE = "Cannot push: the hub is switched off (HF_HUB_OFFLINE=1); unset it to push."


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """The layout `sumtune train` writes (file contents do not matter to what is selected)."""
    run = tmp_path / "run"
    for rel in ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                "tokenizer_config.json", "config.yaml", "metrics.jsonl", "eval/metrics.json",
                "eval/predictions.jsonl", "plots/loss.png", "plots/rouge.png", "tb/events.out.tfevents.1",
                "checkpoints/best/adapter_model.safetensors", "base_model/model.safetensors",
                "profile/summary.json", "report.html"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("{}")
    return run


def test_files_to_push(run_dir):
    assert files_to_push(run_dir) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "config.yaml", "eval/metrics.json",
        "metrics.jsonl", "plots/loss.png", "plots/rouge.png", "tokenizer.json", "tokenizer_config.json"])


def test_offline_is_one_clear_sentence(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SumtuneError) as err:
        push_run(run_dir, "someone/some-adapter")
    assert str(err.value) == OFFLINE_MESSAGE


def test_incomplete_runs_are_refused_before_any_network(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SumtuneError, match="does not exist"):
        push_run(tmp_path / "nope", "someone/x")
    (run_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(SumtuneError, match=r"not a trained run ready to push \(adapter_model.safetensors missing\)"):
        push_run(run_dir, "someone/x")
    (run_dir / "README.md").unlink()
    with pytest.raises(SumtuneError, match=r"README.md missing"):
        push_run(run_dir, "someone/x")


def cli_push(run_dir: Path, repo: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """`sumtune push` in a fresh interpreter: huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import."""
    full_env = {**os.environ, "HF_HOME": str(run_dir.parent / "hf-home"), **env}
    full_env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "sumtune", "push", str(run_dir), repo, *extra],
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_cli_offline(run_dir):
    result = cli_push(run_dir, "someone/some-adapter", {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip() == f"sumtune: error: {OFFLINE_MESSAGE}"


def test_cli_unreachable_hub(run_dir):
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    result = cli_push(run_dir, "someone/some-adapter",
                      {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "--token", "hf_not_a_token")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("sumtune: error: Cannot push: the hub at http://127.0.0.1:9 "
                                                "could not be reached (")


def test_cli_invalid_repo_id(run_dir):
    result = cli_push(run_dir, "bad//id", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
                      "--token", "x")
    assert result.returncode == 2 and "'bad//id' is not a valid repository id" in result.stderr


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers a bad token."""

    def _refuse(self) -> None:
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args) -> None:
        pass


def test_cli_refused_token(run_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = cli_push(run_dir, "someone/some-adapter", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint},
                          "--private", "--token", "hf_bad")
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("sumtune: error: Cannot push: the hub rejected the token (HTTP 401); "
                                     "check it with `hf auth whoami`.")
