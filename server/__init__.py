"""The vaeserve gRPC server: onnxruntime sessions, dynamic batching, the typed API.

Kept light: the server runs without torch installed, and importing it never loads torch.
"""
