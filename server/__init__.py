"""The vaeserve gRPC server: onnxruntime sessions, dynamic batching, the typed API.

Kept light: importing the server must never import torch.
"""
