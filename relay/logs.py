"""How relay's logs look (`--log-format`): text for a terminal, JSON for a log collector.

An event that matters is one line with its fields (`log.info("session evicted",
extra=fields(addr=..., env=..., reason=...))`): in text they follow the message as key=value,
in JSON they are the object's keys. Secrets never reach either (relay/redact.py's filter on the
handler, and field values are redacted here too).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from relay import redact

FIELDS = "relay_fields"  # the LogRecord attribute that holds an event's fields
_BARE = re.compile(r"[-\w.:/@\[\]]+")


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: the event's fields (None values are left out)."""
    return {FIELDS: {k: v for k, v in values.items() if v is not None}}


def _value(value: Any) -> Any:
    return redact.text(value) if isinstance(value, str) else value


def _text_value(value: Any) -> str:
    text = str(_value(value))
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-12-02 11:46:26,707 INFO relay.sdk: session evicted addr=1.2.3.4 env=prod ...`"""

    def __init__(self, worker: int | None = None) -> None:
        where = f"[worker {worker}] " if worker is not None else ""
        super().__init__(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = getattr(record, FIELDS, None)
        if extra:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, worker, the event's
    fields, and exc (a traceback) when there is one."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        for key, value in (getattr(record, FIELDS, None) or {}).items():
            out.setdefault(key, _value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact.text(record.exc_text)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, log_format: str, worker: int | None = None) -> None:
    """The root logger for `relay serve`: one handler on stderr, then the redacting filter."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else TextFormatter(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    redact.install(root.level)
