"""One frozen config dataclass per job, parsed the same way from ``cnnbatch <job>`` and ``python -m jobs.<job>``.

Each field declares its flag and help with :func:`option`; :func:`add_arguments` turns a dataclass into argparse
arguments and :func:`from_namespace` back, so the CLI, the ``jobs/`` entrypoints and the tests share one parser.
Validation lives in each config's ``__post_init__`` and raises ``ValueError`` with what was expected and got.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from typing import Any, TypeVar

from . import storage

C = TypeVar("C")
log = logging.getLogger(__name__)


def option(help: str, default: Any = dataclasses.MISSING, *, flag: str | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None, nargs: str | None = None,
           group: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag (``--field-name`` unless ``flag`` is given); ``group``
    lists it under its own heading in ``--help``."""
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "nargs": nargs, "group": group}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``tuple[str, ...]`` -> (str, False) for nargs fields."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])[0], True
    if origin in (tuple, list):
        return typing.get_args(annotation)[0], False
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    # The job's own flags first, then each group's (inherited option sets such as the augmentation recipe).
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.metadata.get("group") is not None)
    for field in fields:
        meta = field.metadata
        if "help" not in meta:
            continue
        group = meta.get("group")
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        kind, optional = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"]}
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if kind is bool:
            # --flag / --no-flag where the default is on, or where "not given" (None) means something of its own
            on_off = bool(field.default) or (optional and field.default is None)
            kwargs["action"] = argparse.BooleanOptionalAction if on_off else "store_true"
            kwargs["default"] = field.default
        else:
            kwargs["type"] = kind
            if required:
                kwargs["required"] = True
            elif field.default is not dataclasses.MISSING:
                kwargs["default"] = field.default
                if field.default is not None:
                    kwargs["help"] += f" (default: {field.default})"
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
        target.add_argument(flag, **kwargs)


def from_namespace(cls: Any, namespace: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    for field in dataclasses.fields(cls):
        if field.metadata.get("nargs") and isinstance(values.get(field.name), list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-able data with any credentials in URLs redacted (for logs and metadata)."""
    data = dataclasses.asdict(config)
    return json.loads(storage.redact(json.dumps(data, default=str)))


def log_config(config: Any) -> None:
    log.info("%s: %s", type(config).__name__, json.dumps(to_dict(config), sort_keys=True))


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
