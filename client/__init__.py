"""The vaeserve client: a typed gRPC client (VaeClient) and the batch job (vae-generate).

Kept light: importing the client never imports torch or onnxruntime.
"""

from client.client import VaeClient
from client.results import DecodeResult, EncodeResult, ModelInfo, SampleResult
from client.retry import RetryPolicy

__all__ = [
    "VaeClient",
    "ModelInfo",
    "SampleResult",
    "EncodeResult",
    "DecodeResult",
    "RetryPolicy",
]
