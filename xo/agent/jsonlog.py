"""JSON-lines logging for the agent (`xo agent --log-format json`), safe by construction.

Why a formatter of our own: log aggregators want one JSON object per line with stable keys,
and the agent's log calls pass flows, peers and errors as arguments. Any bytes-like or
protobuf argument (a TCP state, a TLS key, a preread) is replaced by its type and size before
the message is formatted, so no key or state bytes can reach a log line by accident.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from google.protobuf.message import Message

# Attributes every LogRecord has; anything else came from `extra=` and is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def redact(value: Any) -> Any:
    """Bytes and protobuf messages become a short description; other values pass."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Message):
        return f"<{type(value).__name__} {value.ByteSize()} bytes>"
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        args: Any = record.args
        if isinstance(args, dict):
            args = {k: redact(v) for k, v in args.items()}
        elif isinstance(args, tuple):
            args = tuple(redact(a) for a in args)
        try:
            msg = str(record.msg) % args if args else str(record.msg)
        except (TypeError, ValueError):
            msg = f"{record.msg} (unformattable arguments)"
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        for k, v in vars(record).items():
            if k not in _STANDARD:
                out[k] = redact(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
