"""JSON from files and options that a user (or a server) hands over, bounded in depth.

``json.loads`` recurses once per level: a few thousand nested brackets raise ``RecursionError``, and
a few hundred parse but make every later recursive walk of the value (deep copies, checks) fail.
vitadapter's configurations nest a few levels, so anything deeper is refused with a named error.
"""
from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


def loads(text: str, source: str) -> Any:
    """The JSON value of ``text``; ``ValueError`` naming ``source`` when it is not JSON or nests deeper
    than ``MAX_DEPTH`` levels."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{source}: JSON nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from e
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    raise ValueError(f"{source}: JSON nested more than {MAX_DEPTH} levels deep")
                stack.append((child, depth + 1))
    return value
