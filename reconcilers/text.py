"""Human text for Kubernetes Event and condition messages.

Events are read by people (``kubectl describe``) and by alert rules, so a message is a
sentence: ``{'desired_vcpus': 4}``, ``None`` or ``<Foo object at 0x7f..>`` in one means a
value was interpolated raw. ``describe`` renders any value as words, ``error_text`` an
exception, and ``repr_fragments`` finds what slipped through (tests sweep producers with it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# What a Python repr leaves in a message: a dict, list or tuple of strings, a bare None,
# an object's default repr.
_REPR = re.compile(r"\{'|\['|\('|\bNone\b|<[^<>]*\bobject at 0x[0-9a-f]+>")


def repr_fragments(message: str) -> list[str]:
    """The parts of ``message`` that look like an interpolated Python repr (empty: clean)."""
    return _REPR.findall(message)


def describe(value: Any) -> str:
    """``value`` as words: none for None, items joined by commas, mappings as key=value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, BaseException):
        return error_text(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{describe(k)}={describe(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (set, frozenset)):
        return ", ".join(sorted(describe(v) for v in value)) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(describe(v) for v in value) or "none"
    text = str(value)
    return type(value).__name__ if repr_fragments(text) else text  # a default object repr


def error_text(exc: BaseException) -> str:
    """What went wrong, for a message: the exception's own text, never empty and never a
    repr (``KeyError('x')`` prints as ``'x'``, ``TimeoutError()`` as nothing)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return f"missing key {describe(exc.args[0])}"
    if isinstance(exc, OSError) and exc.strerror:
        names = [describe(n) for n in (exc.filename, exc.filename2) if n is not None]
        return exc.strerror + (f": {' -> '.join(names)}" if names else "")
    text = str(exc).strip()
    if not text:
        return f"{type(exc).__name__} (no detail)"
    if repr_fragments(text) and len(exc.args) > 1:  # Exception("a", 1) prints as a tuple
        return "; ".join(describe(a) for a in exc.args)
    return text
