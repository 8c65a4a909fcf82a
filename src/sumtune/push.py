"""`sumtune push DIR REPO`: upload a run's adapter, or a merged model, to the Hugging Face Hub with `huggingface_hub`.

What goes up is what someone needs to use and judge it. From a run directory: the PEFT adapter, the model card
(README.md, with YAML metadata), the tokenizer, the resolved config, the metrics and the plots; checkpoints,
TensorBoard event files, traces and the local copy of a tiny base model stay home. From a directory written by
`sumtune merge`: the model's config, generation config, safetensors weights, tokenizer and model card. Every failure
(offline, no token, no network, refused) becomes one `SumtuneError` sentence.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from sumtune.errors import SumtuneError

PUSH_PATTERNS = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "vocab.json", "vocab.txt", "merges.txt", "config.yaml", "metrics.jsonl", "eval/metrics.json", "plots/*.png",
)
REQUIRED = ("adapter_config.json", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "vocab.json", "vocab.txt", "merges.txt")
MERGED_PATTERNS = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                   "model.safetensors.index.json", "README.md", *TOKENIZER_FILES)
MERGED_REQUIRED = ("config.json", "README.md")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set, read now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def is_merged_model(directory: str | Path) -> bool:
    """A directory `sumtune merge` wrote: a plain transformers model (config.json), no adapter."""
    directory = Path(directory)
    return (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file()


def files_to_push(run_dir: str | Path) -> list[str]:
    """The files that go to the hub (a run's or a merged model's), as paths relative to the directory, sorted."""
    run = Path(run_dir)
    patterns = MERGED_PATTERNS if is_merged_model(run) else PUSH_PATTERNS
    found = []
    for path in run.rglob("*"):
        rel = path.relative_to(run).as_posix()
        if path.is_file() and any(fnmatch.fnmatchcase(rel, pattern) for pattern in patterns):
            found.append(rel)
    return sorted(found)


def _check_run(run: Path) -> list[str]:
    if not run.is_dir():
        raise SumtuneError(f"Run directory {str(run)!r} does not exist.")
    files = files_to_push(run)
    if is_merged_model(run):
        missing = [name for name in MERGED_REQUIRED if name not in files]
        if missing or not any(f.endswith(".safetensors") for f in files):
            missing = missing or ["model.safetensors"]
            raise SumtuneError(f"{str(run)!r} is not a merged model ready to push ({', '.join(missing)} missing).")
        return files
    missing = [name for name in REQUIRED if name not in files]
    if missing or not any(f.startswith("adapter_model.") for f in files):
        missing = missing or ["adapter_model.safetensors"]
        raise SumtuneError(f"{str(run)!r} is not a trained run ready to push ({', '.join(missing)} missing).")
    return files


def _first_line(err: BaseException, width: int = 160) -> str:
    text = str(err).strip().splitlines()
    return text[0][:width] if text else type(err).__name__


def explain_hub_error(err: Exception, repo_id: str) -> str:
    """One sentence for a failure of huggingface_hub while pushing."""
    from huggingface_hub import constants, errors

    if isinstance(err, errors.OfflineModeIsEnabled):
        return "Cannot push: the hub is switched off (HF_HUB_OFFLINE=1); unset it to push."
    if isinstance(err, errors.LocalTokenNotFoundError):
        return "Cannot push: no Hugging Face token; run `hf auth login`, set HF_TOKEN, or pass --token."
    if isinstance(err, errors.HFValidationError):
        return f"Cannot push: {repo_id!r} is not a valid repository id ({_first_line(err)})."
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            return "Cannot push: the hub rejected the token (HTTP 401); check it with `hf auth whoami`."
        if status == 403:
            return f"Cannot push: this token may not write to {repo_id!r} (HTTP 403); use a token with write access."
        return f"Cannot push to {repo_id!r}: the hub answered HTTP {status} ({_first_line(err)})."
    # the HTTP library's own errors (connection refused, DNS, timeouts) or socket errors: the hub was not reached
    return (f"Cannot push: the hub at {constants.ENDPOINT} could not be reached "
            f"({type(err).__name__}: {_first_line(err)}).")


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
             progress: bool = True) -> str:
    """Create REPO (if needed) and upload the run's adapter, model card, tokenizer, config and metrics, or a
    merged model (`sumtune merge`'s directory) with its model card.

    Returns the repository's URL. Raises SumtuneError when the directory is incomplete or the hub cannot be used.
    `progress`: the hub's upload bars (only on a terminal).
    """
    run = Path(run_dir).expanduser()
    files = _check_run(run)
    if hub_offline():
        raise SumtuneError("Cannot push: the hub is switched off (HF_HUB_OFFLINE=1); unset it to push.")
    try:
        import huggingface_hub
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise SumtuneError("Cannot push: huggingface_hub is not installed (pip install huggingface_hub).") from None
    from sumtune.progress import Progress

    Progress(enabled=progress)  # no bars (off, or no terminal): the hub's own are silenced too
    kind = "merged model" if is_merged_model(run) else "sumtune run"
    try:
        validate_repo_id(repo_id)
        url = huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        huggingface_hub.upload_folder(repo_id=url.repo_id, folder_path=str(run), allow_patterns=files, token=token,
                                      repo_type="model", commit_message=f"Upload {kind} {run.resolve().name}")
    except hub_failures() as err:
        raise SumtuneError(explain_hub_error(err, repo_id)) from None
    return str(url)


def hub_failures() -> tuple[type[BaseException], ...]:
    """What the hub raises when it is off, refuses, or cannot be reached (not bugs: those keep their traceback).

    Connection failures come from the HTTP library that huggingface_hub is built on, which changes between its
    majors (requests in 0.x, httpx in 1.x, httpx2 in 2.x). `HfHubHTTPError` subclasses that library's base error,
    so the base is taken from there rather than from a list of module names that the next major outdates.
    """
    from huggingface_hub import errors

    failures: list[type[BaseException]] = [errors.HfHubHTTPError, errors.OfflineModeIsEnabled,
                                           errors.LocalTokenNotFoundError, errors.HFValidationError, OSError]
    failures += transport_errors(errors.HfHubHTTPError)
    return tuple(failures)


def transport_errors(hub_error: type[BaseException]) -> list[type[BaseException]]:
    """The HTTP library's exception classes among `hub_error`'s bases (e.g. httpx2.HTTPError, every
    httpx2 connection error's base; requests' are OSErrors already), neither builtins nor huggingface_hub's."""
    return [cls for cls in hub_error.__mro__[1:]
            if issubclass(cls, BaseException) and cls.__module__.split(".")[0] not in ("builtins", "huggingface_hub")]
