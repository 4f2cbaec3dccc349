"""Export: checkpoint → ONNX graphs + manifest in a model repository.

Kept light on purpose: ``export.manifest`` is imported by the torch-free server.
"""
