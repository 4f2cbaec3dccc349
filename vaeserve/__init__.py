"""vaeserve: train, export and serve variational autoencoders.

One import name, in layers: ``vaeserve.training`` (torch) → ``vaeserve.export`` (ONNX graphs
and the manifest) → ``vaeserve.engine`` (torch-free: open a model version, sample, encode,
decode) → ``vaeserve.server`` and ``vaeserve.client`` side by side. What every part shares
sits at this level: the manifest, the errors, ``ModelInfo``, the wire tensors and helpers, and
the generated stubs.
docs/architecture.md draws the map.
"""
