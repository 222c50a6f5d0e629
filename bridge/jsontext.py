"""JSON text of what the bridge writes on a turn's path: request bodies, journal pieces, the
history, the message a Yach send carries.

orjson makes it several times faster than `json.dumps` (compact, non-ASCII as is, which the
readers of every one of these take alike). What orjson refuses — a lone surrogate, an integer
beyond 64 bits — is written by the standard library instead, as it always was.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps"]


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False)
