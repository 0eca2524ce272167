"""Nothing secret in relay's log, at any level.

The secrets: SDK keys (in an `Authorization: Bearer` header or an auth frame), the admin token,
the peer token, the SDK-key secret, and a password in the store's URL. Two layers:

- At the source: websockets' DEBUG output is every request header and every frame (in hex, the
  auth frame's SDK key included) of the SDK server (`websockets.server`) and of the peer links
  (`websockets.client`, whose Authorization header is the peer token). No pattern can tell a
  key inside a hex dump, so that output is never produced: the `websockets` loggers stay at
  INFO or above whatever --log-level says (their protocol objects then skip it altogether).
- Over everything that reaches the log handlers: a filter that replaces, in each record's
  message and traceback, the secrets this process holds (`register`), any `Bearer <credential>`
  and the password of a URL. SDK keys are not known in advance: the `Bearer` pattern and the
  first layer cover them, and relay itself never logs one.
"""

from __future__ import annotations

import logging
import re

REDACTED = "<redacted>"
# Shorter secrets are not replaced by value (every "t" of the log would go); they are weak
# anyway. The patterns below still hide them where they appear as credentials.
_MIN_LEN = 6
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;)\]}>]+")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&\s]+")

_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register(*values: str | bytes) -> None:
    """Secrets of this process (tokens, the SDK-key secret): replaced wherever they appear."""
    global _pattern
    for value in values:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if len(text) >= _MIN_LEN:
            _secrets.add(text)
    if _secrets:  # longest first: a secret that contains another is replaced whole
        _pattern = re.compile("|".join(map(re.escape, sorted(_secrets, key=len, reverse=True))))


def text(value: str) -> str:
    """`value` with every known secret, bearer credential and URL password replaced."""
    if _pattern is not None:
        value = _pattern.sub(REDACTED, value)
    value = _BEARER.sub(r"\1" + REDACTED, value)
    value = _QUERY_PASSWORD.sub(r"\1" + REDACTED, value)
    return _URL_PASSWORD.sub(r"\1" + REDACTED + "@", value)


class RedactingFilter(logging.Filter):
    """On a handler: each record leaves with its message (arguments merged in) and its
    traceback redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = text(record.exc_text)
        if record.stack_info:
            record.stack_info = text(record.stack_info)
        return True


def install(level: int) -> None:
    """After logging.basicConfig: the filter on every root handler (a filter on a logger
    would miss what its children propagate), and websockets' DEBUG output off."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    logging.getLogger("websockets").setLevel(max(level, logging.INFO))
