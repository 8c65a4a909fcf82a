"""Dataclass arguments ↔ YAML ↔ command line, with one clear sentence for every mistake.

Each dataclass field carries a docstring (a string literal right under it, litgpt style); it becomes the
field's `--help` text. The dataclass is the single source of truth: YAML keys and CLI flags are its field
names (underscores on the command line become dashes).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from sumtune.errors import SumtuneError

_NONE_WORDS = {"none", "null", "~"}

# The names people bring from Hugging Face (Seq2SeqTrainingArguments, run_summarization.py, BitsAndBytesConfig,
# LoraConfig) → the TrainConfig field that means the same or the nearest thing; what "did you mean" offers first.
HF_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps", "lr_scheduler_type": "lr_schedule",
    "warmup_ratio": "warmup_steps", "logging_steps": "log_every_steps", "eval_steps": "eval_every_steps",
    "eval_strategy": "eval_every_steps", "evaluation_strategy": "eval_every_steps",
    "save_steps": "checkpoint_every_steps", "save_strategy": "checkpoint_every_steps",
    "save_total_limit": "keep_last_checkpoints", "optim": "optimizer", "overwrite_output_dir": "overwrite",
    "resume_from_checkpoint": "resume", "dataloader_num_workers": "num_workers",
    "dataloader_pin_memory": "pin_memory", "torch_compile": "compile", "bf16": "compute_dtype",
    "fp16": "compute_dtype", "torch_dtype": "compute_dtype", "bnb_4bit_compute_dtype": "compute_dtype",
    "generation_num_beams": "num_beams", "generation_max_length": "max_new_tokens",
    "max_length": "max_new_tokens", "min_length": "min_new_tokens",
    "max_source_length": "max_source_tokens", "max_target_length": "max_target_tokens",
    "val_max_target_length": "max_new_tokens", "max_train_samples": "max_samples",
    "max_eval_samples": "eval_max_samples", "model_name_or_path": "model", "tokenizer_name": "tokenizer",
    "dataset_name": "dataset", "train_file": "dataset", "validation_file": "eval_dataset",
    "test_file": "eval_dataset", "validation_split_percentage": "eval_ratio", "load_in_4bit": "quantization",
    "load_in_8bit": "quantization", "bnb_4bit_quant_type": "quantization",
    "bnb_4bit_use_double_quant": "double_quant", "r": "lora_r", "lora_rank": "lora_r",
    "target_modules": "lora_targets", "early_stopping": "early_stopping_patience",
    "use_cpu": "device", "no_cuda": "device",
}


def suggest(name: str, valid: typing.Iterable[str]) -> str | None:
    """The valid name (as spelled in `valid`: `--max-steps` or `max_steps`) that `name` most likely meant:
    the same name with the other separator, then a Hugging Face name's counterpart, then the closest spelling."""
    spelled = {v.lstrip("-").replace("-", "_").lower(): v for v in valid}
    key = name.strip().lstrip("-").replace("-", "_").lower()
    if key in spelled:
        return spelled[key]
    if HF_NAMES.get(key) in spelled:
        return spelled[HF_NAMES[key]]
    close = difflib.get_close_matches(key, list(spelled), n=1, cutoff=0.6)
    return spelled[close[0]] if close else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with sumtune's manners: no abbreviations (`--warmup 5` is not `--warmup-steps 5`), and every
    mistake one line on stderr, with a suggestion where one fits, and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        choice = re.search(r"invalid choice: '?([^'\s]+)'? \(choose from (.*)\)", message)
        if choice:
            hint = suggest(choice.group(1), [c.strip(" '\"") for c in choice.group(2).split(",")])
            message += f"; did you mean {hint!r}?" if hint else ""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def unknown_arguments(self, extras: list[str]) -> typing.NoReturn:
        """The error for what no option took: the first unknown option, with the option it most likely meant."""
        option = next((a.split("=", 1)[0] for a in extras if a.startswith("-") and a != "-"), None)
        if option is None:
            self.error(f"unexpected argument {extras[0]!r} (see `{self.prog} --help`)")
        hint = suggest(option, [o for o in self._option_string_actions if o.startswith("--")])
        self.error(f"unknown option {option}" + (f"; did you mean {hint}?" if hint else f" (see `{self.prog} --help`)"))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _union_members(tp: Any) -> tuple[Any, ...] | None:
    """The members of a union such as `int | Literal["auto"]` (None for any other type)."""
    return get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else None


def describe_type(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    members = _union_members(tp)
    if members:
        text = " or ".join(describe_type(m) for m in members if m is not type(None))
        return f"{text} (or none)" if type(None) in members or optional else text
    if get_origin(tp) is Literal:
        text = " | ".join(str(a) for a in get_args(tp))
    elif get_origin(tp) is list:
        text = f"a list of {describe_type(get_args(tp)[0])}"
    else:
        text = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
    return f"{text} (or none)" if optional else text


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or the command line) to the field type `tp`, or say which key is wrong."""
    inner, optional = _unwrap_optional(tp)
    none_word = isinstance(value, str) and value.strip().lower() in _NONE_WORDS
    if none_word and not optional and (get_origin(inner) is list or value.strip().lower() in get_args(inner)):
        none_word = False  # a list (`report_to: none` is ["none"]) or a choice named "none" takes the word itself
    if value is None or none_word:
        if optional:
            return None
        raise SumtuneError(f"`{name}` cannot be empty: expected {describe_type(tp)}.")
    bad = SumtuneError(f"`{name}` must be {describe_type(tp)}, got {value!r}.")
    members = _union_members(inner)
    if members:  # e.g. batch_size: an integer or `auto`; the first member that accepts the value wins
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(name, value, member)
            except SumtuneError:
                continue
        raise bad
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise SumtuneError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")
    if origin is list:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(name, v, get_args(inner)[0]) for v in value]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_mapping(cls: type, values: dict[str, Any], *, source: str = "the config") -> Any:
    """Build `cls` from a mapping; unknown keys and wrong types are refused naming the key."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_), key=str)
    if unknown:
        hints = {key: suggest(str(key), types_) for key in unknown}
        if any(hints.values()):
            named = ", ".join(f"{key!r}" + (f" (did you mean {hints[key]!r}?)" if hints[key] else "")
                              for key in unknown)
            raise SumtuneError(f"Unknown key{'s' if len(unknown) > 1 else ''} {named} in {source}.")
        raise SumtuneError(
            f"Unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {source}; "
            f"valid keys are: {', '.join(sorted(types_))}."
        )
    kwargs = {k: coerce(k, v, types_[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - dataclass signature mismatch is a programming error
        raise SumtuneError(f"Bad arguments for {cls.__name__}: {err}.") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    from sumtune.safe_io import require_file

    path = require_file(path, "Config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SumtuneError(f"Config file {str(path)!r} is not UTF-8 text.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SumtuneError(f"Config file {str(path)!r} is not valid YAML{where}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SumtuneError(f"Config file {str(path)!r} must hold a mapping of keys to values.")
    return data


def to_mapping(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def write_yaml(obj: Any, path: str | Path) -> None:
    from sumtune.safe_io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_mapping(obj), sort_keys=False))


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per field; defaults are SUPPRESSed so only typed values override YAML."""
    docs = field_docs(cls)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    group = parser.add_argument_group(f"{cls.__name__} options (also settable as YAML keys)")
    for name, tp in field_types(cls).items():
        if name in skip:
            continue
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(name, '')} [{describe_type(tp)}; default: {default}]".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        inner, _ = _unwrap_optional(tp)
        if "cli_const" in f.metadata:  # `--resume` alone means `--resume latest`
            group.add_argument(flag, dest=name, nargs="?", const=f.metadata["cli_const"], default=argparse.SUPPRESS,
                               metavar=name.upper(), help=help_text)
        elif inner is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif get_origin(inner) is list:
            group.add_argument(flag, dest=name, nargs="+", default=argparse.SUPPRESS, metavar="VALUE",
                               help=help_text)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def resolve(cls: type, config_path: str | None, overrides: dict[str, Any]) -> Any:
    """Defaults ← YAML file ← command-line overrides, validated by the dataclass."""
    values: dict[str, Any] = {}
    if config_path:
        values.update(read_yaml(config_path))
        from_mapping(cls, values, source=f"config file {config_path!r}")  # name the file in key errors
    values.update(overrides)
    return from_mapping(cls, values)
