"""The parts of the documentation that the operation table writes.

The protocol reference's summary of operations and the signatures of the
master's methods are made from :data:`remsh.ops.OPERATIONS` and from the
methods themselves, not copied by hand, so they cannot drift from the code.
``docs/_ext/remsh_docgen.py`` turns these lines into Sphinx directives; the
tests read them here, without Sphinx.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Tuple

from remsh.ops import OPERATIONS, Key, Operation

#: the header of the summary table
SUMMARY_HEADER = ("meth", "request keys", "reply", "its own error tags")


def _key_name(key: Key) -> str:
    return f"``{key.name}*``" if key.prefix else f"``{key.name}``"


def request_text(op: Operation) -> str:
    """An operation's request keys in words: the required ones, then the
    optional ones."""
    required = [_key_name(k) for k in op.request if not k.optional and not k.prefix]
    optional = [_key_name(k) for k in op.request if k.optional or k.prefix]
    if not required and not optional:
        return "--"
    if not required:
        return "optional " + ", ".join(optional)
    text = ", ".join(required)
    if optional:
        text += "; optional " + ", ".join(optional)
    return text


def reply_text(op: Operation) -> str:
    """An operation's final reply box in words (a conversation's boxes are
    described in its own section)."""
    if op.conversation:
        return "see below"
    names = [f"{k.name}NAME: value, ..." if k.prefix else k.name for k in op.reply]
    return "``{" + ", ".join(names) + "}``"


def errors_text(op: Operation) -> str:
    """The tags of an operation's own errors."""
    return ", ".join(f"``{tag}``" for tag in op.errtags) or "--"


def summary_rows() -> List[Tuple[str, str, str, str]]:
    """One row per operation, in the table's order."""
    return [(f"``{op.meth}``", request_text(op), reply_text(op), errors_text(op))
            for op in OPERATIONS.values()]


def summary_table() -> List[str]:
    """The summary as the lines of a reStructuredText list table."""
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 14 36 24 26", ""]
    for row in [SUMMARY_HEADER, *summary_rows()]:
        first, *rest = row
        lines.append(f"   * - {first}")
        lines.extend(f"     - {cell}" for cell in rest)
    return lines


def _default(value: Any) -> str:
    return "[]" if value == () else repr(value)


def method_signature(cls: type, name: str) -> str:
    """``name(params)`` of a method of ``cls`` as the documentation shows it:
    the parameters and their defaults, without ``self`` and annotations."""
    sig = inspect.signature(getattr(cls, name))
    parts: List[str] = []
    star_done = False
    for param in list(sig.parameters.values())[1:]:
        if param.kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if param.kind is param.VAR_POSITIONAL:
            parts.append("*" + param.name)
            star_done = True
            continue
        if param.kind is param.VAR_KEYWORD:
            parts.append("**" + param.name)
            continue
        text = param.name
        if param.default is not param.empty:
            text += "=" + _default(param.default)
        parts.append(text)
    return f"{name}({', '.join(parts)})"
