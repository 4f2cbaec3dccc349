"""The torch-free engine: open a model version of a repository and run it under the
sampling contract. The server's servicers and ``vae-generate --local`` both stand on it;
Python users call ``Engine`` directly. Imports onnxruntime.
"""

from vaeserve.engine.engine import Engine

__all__ = ["Engine"]
