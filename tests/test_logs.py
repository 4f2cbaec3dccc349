"""Structured logs: one JSON object per line, the event's fields as top-level keys."""

from __future__ import annotations

import json
import logging
import sys

from vaeserve.server.logs import JsonFormatter


def _record(message: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    record = logging.LogRecord(
        "vaeserve.server.observer", logging.INFO, __file__, 1, message, args, exc_info
    )
    record.__dict__.update(extra)
    return record


def test_a_json_line_holds_the_message_and_the_event_fields():
    fields = {"event": "rpc_failed", "rpc": "ModelInfer", "code": "NOT_FOUND", "latency_ms": 1.5}
    record = _record("rpc failed: rpc=%s code=%s", "ModelInfer", "NOT_FOUND", **fields)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "rpc failed: rpc=ModelInfer code=NOT_FOUND"
    assert (entry["level"], entry["logger"]) == ("INFO", "vaeserve.server.observer")
    assert (entry["event"], entry["code"], entry["latency_ms"]) == ("rpc_failed", "NOT_FOUND", 1.5)
    assert entry["time"].endswith("Z")


def test_a_traceback_stays_inside_its_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("unexpected", exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exception"]
