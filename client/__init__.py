"""The vaeserve client: typed gRPC clients (VaeClient, blocking; AsyncVaeClient, asyncio) and
the batch jobs (vae-generate, vae-score).

Kept light: importing the client never imports torch or onnxruntime.
"""

from vaeserve.client.aio import AsyncVaeClient
from vaeserve.client.client import VaeClient
from vaeserve.client.results import DecodeResult, EncodeResult, ModelInfo, SampleResult
from vaeserve.client.retry import RetryPolicy

__all__ = [
    "VaeClient",
    "AsyncVaeClient",
    "ModelInfo",
    "SampleResult",
    "EncodeResult",
    "DecodeResult",
    "RetryPolicy",
]
