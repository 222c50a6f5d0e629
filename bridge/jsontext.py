"""JSON text of what the bridge writes on a turn's path: request bodies, journal pieces, the
history, the message a Yach send carries; and what reading a server's JSON may raise.

orjson makes it several times faster than `json.dumps` (compact, non-ASCII as is, which the
readers of every one of these take alike). What orjson refuses — a lone surrogate, an integer
beyond 64 bits — is written by the standard library instead, as it always was.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["UNREADABLE", "dumps"]

# What `json.loads` raises on text it cannot read: ValueError (JSONDecodeError's base, and an
# integer of more digits than `int` converts, 4300) and RecursionError (`[[[…` nested deeper
# than Python's stack). Left to escape, either failed the entry with a traceback.
UNREADABLE = (ValueError, RecursionError)


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False)
