"""Building a message key (sequence key, later unique key) from a task and its arguments.

The key is readable when it is short (``proj.sync:{"customer_id":"cus_42"}``) and a SHA-256
digest of that text when it would be longer than the transport accepts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .errors import ConfigurationError, MessageError
from .message import MAX_KEY_BYTES


def argument_names(option: str, by_args: Any) -> tuple[str, ...] | None:
    """A task option's ``by_args``: None (all arguments), () (none) or the chosen names."""
    if isinstance(by_args, bool):
        return None if by_args else ()
    if isinstance(by_args, str) or not all(isinstance(n, str) for n in by_args):
        raise ConfigurationError(
            f"{option}(by_args=...) takes True, False or a list of argument names, "
            f"got {by_args!r}"
        )
    return tuple(by_args)


def select_arguments(
    fn: Callable[..., Any], task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
    names: Iterable[str] | None,
) -> dict[str, Any]:
    """The call's arguments by parameter name (positional ones resolved through the
    signature, defaults applied); only ``names`` when given."""
    signature = inspect.signature(fn)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise MessageError(f"cannot compute the key of task {task_name!r}: {exc}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if names is None:
        return arguments
    selected = {}
    for name in names:
        if name not in signature.parameters:
            raise MessageError(
                f"task {task_name!r} has no argument {name!r} (it takes: "
                f"{', '.join(signature.parameters) or 'no arguments'})"
            )
        selected[name] = arguments[name]
    return selected


def build_key(parts: list[str], arguments: Mapping[str, Any] | None) -> str:
    text = ":".join(parts)
    if arguments:
        encoded = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str,
                             ensure_ascii=False)
        text = f"{text}:{encoded}" if text else encoded
    if not text:
        raise MessageError("the key would be empty: keep the task name or select arguments")
    if len(text.encode("utf-8")) > MAX_KEY_BYTES:
        prefix = parts[0] if parts else ""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        text = f"{prefix}:sha256:{digest}" if prefix else f"sha256:{digest}"
    return text
