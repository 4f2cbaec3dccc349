"""Log output of ``vae-serve``: human-readable lines or one JSON object per line.

Events that operators search for (a failed request, a model version loaded or unloaded) are
logged with ``extra={"event": ..., field: value}``. The text format already spells those fields
as ``key=value`` in the message; the JSON format also emits each as a top-level key, so a log
pipeline can filter on ``event`` and ``code`` without parsing messages. Configured only by
``main()``; nothing here runs at import.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from vaeserve.server.settings import LOG_FORMATS

__all__ = ["JsonFormatter", "configure_logging"]

# Every attribute a plain LogRecord has; anything else on a record came in through `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the root logger's records to stderr in ``fmt`` ("text" or "json").

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log_format: expected one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
