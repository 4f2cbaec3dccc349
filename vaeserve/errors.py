"""Every error vaeserve raises on purpose, under one root: ``VaeServeError``.

A library user catches ``VaeServeError`` for all of them, or one subclass. Each class names the
gRPC status it stands for (``status``, a ``grpc.StatusCode`` name): the server turns a raised
error into that status with its message, and the client turns a status it receives back into
the same class (``error_for_status``), so ``except ModelNotFound`` reads the same on both sides
of the wire. This module imports neither grpc nor torch: training, export and the engine raise
these too.
"""

from __future__ import annotations

__all__ = [
    "VaeServeError",
    "InvalidRequest",
    "ModelNotFound",
    "QueueFull",
    "NotServing",
    "ModelControlDisabled",
    "DeadlineExceeded",
    "Unauthenticated",
    "PermissionDenied",
    "ServerError",
    "ManifestError",
    "RepositoryError",
    "ProviderUnavailable",
    "MalformedMessage",
    "error_for_status",
]


class VaeServeError(Exception):
    """The root of every error vaeserve raises on purpose.

    Attributes:
        status: the gRPC status code's name that stands for this error on the wire.
        code: on errors the client raised, the ``grpc.StatusCode`` it received; else None.
    """

    status = "INTERNAL"
    code: object = None


# --- a request or a call that went wrong: each maps to one status code ---


class InvalidRequest(VaeServeError, ValueError):
    """A malformed request: wrong dtype, shape, byte length, label, count or option."""

    status = "INVALID_ARGUMENT"


class ModelNotFound(VaeServeError, LookupError):
    """An unknown model name or version."""

    status = "NOT_FOUND"


class QueueFull(VaeServeError):
    """A queue or a server-wide bound is at capacity; retry with backoff."""

    status = "RESOURCE_EXHAUSTED"


class NotServing(VaeServeError):
    """The server is still loading models, is shutting down, or cannot be reached."""

    status = "UNAVAILABLE"


class ModelControlDisabled(NotServing):
    """A model load or unload asked of a server whose model control mode is not "explicit".

    UNAVAILABLE, as Triton answers it; unlike the other ``NotServing`` errors, a retry does not
    help until the server runs with ``--model-control-mode explicit``.
    """


class DeadlineExceeded(VaeServeError):
    """The call's deadline passed before its answer was ready."""

    status = "DEADLINE_EXCEEDED"


class Unauthenticated(VaeServeError):
    """The call carried no valid bearer token."""

    status = "UNAUTHENTICATED"


class PermissionDenied(VaeServeError):
    """The caller may not make this call."""

    status = "PERMISSION_DENIED"


class ServerError(VaeServeError):
    """The server failed for a reason of its own (INTERNAL, UNKNOWN or another status)."""


# --- files and environments that cannot be used ---


class ManifestError(VaeServeError, ValueError):
    """A manifest.json, or a version folder, that is not a valid model version."""


class RepositoryError(VaeServeError, RuntimeError):
    """A model repository that cannot be served at all (missing folder, unknown model)."""


class ProviderUnavailable(VaeServeError, RuntimeError):
    """The onnxruntime execution provider asked for cannot run here (e.g. no CUDA)."""


class MalformedMessage(InvalidRequest):
    """Bytes that are not a valid protobuf message, or a tensor whose bytes disagree with its
    shape."""


_BY_STATUS: dict[str, type[VaeServeError]] = {
    cls.status: cls
    for cls in (
        InvalidRequest,
        ModelNotFound,
        QueueFull,
        NotServing,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
    )
}


def error_for_status(status: str, message: str) -> VaeServeError:
    """The error that a call ended with ``status`` (a status code's name) stands for.

    Statuses without a class of their own (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...) give a
    ``ServerError`` whose ``status`` is the one received.
    """
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    error = ServerError(message)
    error.status = status
    return error
