"""Pydantic validation failures as one line per problem, naming the field (as the user wrote
its path in the YAML) and the fix."""

from __future__ import annotations

import difflib

from pydantic import ValidationError

from trials.adapters import FAMILIES

# Loc entries Pydantic adds for union members; they are not part of the user's key path.
_UNION_TAGS = {"grid", "distribution", *FAMILIES, "fifo", "asha"}


def field_path(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            if i and loc[i - 1] == "grid":
                continue  # a value of a trainer grid: the message names the value itself
            parts.append(f"[{item}]")
            continue
        previous = loc[i - 1] if i else None
        if item in _UNION_TAGS and (isinstance(previous, int) or previous in ("scheduler", "adapter") or item in ("grid", "distribution")):
            continue
        if item.startswith(("function-", "list[", "int", "float", "str", "bool")) and item not in ("int",):
            continue
        parts.append(("." if parts else "") + item)
    return "".join(parts) or "spec"


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required field is missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx", {})
        tag = ctx.get("tag")
        expected = ctx.get("expected_tags", "")
        if tag is None:
            return f"missing `type`; use one of {expected}"
        names = [t.strip().strip("'") for t in str(expected).split(",")]
        close = difflib.get_close_matches(str(tag), names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {expected}"
        return f"unknown type {tag!r} ({hint})"
    bound = _BOUNDS.get(kind)
    if bound is not None:
        op, key = bound
        return f"must be {op} {err['ctx'][key]} (got {err['input']!r})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind not in ("unknown_key",) and "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def validation_lines(err: ValidationError) -> list[str]:
    lines: list[str] = []
    for e in err.errors():
        line = f"{field_path(tuple(e['loc']))}: {_message(e)}"
        if line not in lines:
            lines.append(line)
    return lines
