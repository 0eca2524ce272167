"""JSON as the admin API takes it: strict (no NaN or Infinity), finite numbers only, integers
of at most MAX_INT_DIGITS digits. The API reads bodies with it and the CLI checks values with
it before it sends them, so both refuse the same things with the same words."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any

# The longest integer literal accepted: what int() converts by default (longer ones raise
# ValueError, which is not a JSONDecodeError). Callers then check their own ranges (a flag
# value: msgpack's -2**63 to 2**64-1).
MAX_INT_DIGITS = sys.int_info.default_max_str_digits


class JsonValueError(ValueError):
    """JSON the API refuses; the message says why, for a user."""


class JsonSyntaxError(JsonValueError):
    """Not JSON at all (or NaN, Infinity, nesting too deep)."""


def clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _int(literal: str) -> int:
    digits = len(literal) - literal.startswith("-")
    if digits <= MAX_INT_DIGITS:
        with contextlib.suppress(ValueError):  # (a lower sys.set_int_max_str_digits)
            return int(literal)
    raise JsonValueError(f"a number is too long: an integer of {digits} digits "
                         f"({clip(literal)}); integers must be from -2**63 to 2**64-1")


def _float(literal: str) -> float:
    """Finite floats only (1e400 would be read as infinity, which is not JSON)."""
    value = float(literal)
    if not math.isfinite(value):
        raise JsonValueError(f"a number is too large: {clip(literal)} is beyond a 64-bit "
                             "float; numbers must be finite")
    return value


def _no_constants(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def loads(raw: bytes | str) -> Any:
    """The value, or JsonValueError (JsonSyntaxError for what is not JSON)."""
    try:
        return json.loads(raw, parse_constant=_no_constants, parse_int=_int,
                          parse_float=_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonSyntaxError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise JsonSyntaxError("nested too deeply") from None
