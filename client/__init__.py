"""The vaeserve client: a typed gRPC client (VaeClient) and the batch job (vae-generate).

Kept light: importing the client never imports torch or onnxruntime.
"""

from vaeserve.client.client import VaeClient
from vaeserve.client.results import DecodeResult, EncodeResult, ModelInfo, SampleResult
from vaeserve.client.retry import RetryPolicy

__all__ = [
    "VaeClient",
    "ModelInfo",
    "SampleResult",
    "EncodeResult",
    "DecodeResult",
    "RetryPolicy",
]
