"""The ``vae-serve`` command: one server process, or ``--workers N`` under a supervisor.

Kept apart from server/app.py so that the supervisor (server/workers.py), which starts
workers that each call ``app.run``, and the app do not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from vaeserve.server.app import run
from vaeserve.server.logs import configure_logging
from vaeserve.server.settings import ServerSettings
from vaeserve.server.workers import supervise

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vae-serve`` command."""
    settings = ServerSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        return supervise(settings)
    return run(settings)
