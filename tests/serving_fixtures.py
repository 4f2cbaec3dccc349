"""Helpers of the server's end-to-end tests (not a test module itself).

A tiny model repository exported by the real exporter, an in-process server on a loop of its
own thread, and the reference every answer is compared with: the same ONNX files run
directly in onnxruntime, with the noise of the sampling contract (server/sampling.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from vaeserve.engine import sampling
from vaeserve.manifest import MANIFEST_FILE, load_version_manifest
from vaeserve.proto.v1 import vaeserve_pb2 as pb

WAIT_S = 60.0  # upper bound of every wait on a server; never reached when tests pass
MAX_MESSAGE = 64 << 20
# name -> ModelConfig overrides of the tiny models (latent 2, hidden 16, 1x8x8 digits)
MODELS = {
    "vae": {},
    "concat": {"kind": "cvae", "conditioning": "concat"},
    "prior": {"kind": "cvae", "conditioning": "prior"},
}
COPIED = ("vae", 2)  # a second version of "vae" (the same graphs): "latest" must pick it
BROKEN = ("vae", 3)  # a version whose decoder.onnx does not match its manifest
_NP = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.INT64: np.int64, pb.UINT8: np.uint8}


def export_repository(root: Path, work: Path) -> Path:
    """Export MODELS through vae-export's Python API into ``root``, plus two more versions."""
    from export_fixtures import save_tiny_checkpoint, tiny_config

    from vaeserve.export.onnx_export import export_checkpoint

    for name, overrides in MODELS.items():
        checkpoint = save_tiny_checkpoint(work / f"{name}.pt", tiny_config(**overrides))
        export_checkpoint(checkpoint, root, name, version=1)
    _copy_version(root, *COPIED)
    broken = _copy_version(root, *BROKEN)
    with open(broken / "decoder.onnx", "ab") as f:
        f.write(b"tampered")
    return root


def _copy_version(root: Path, name: str, version: int) -> Path:
    target = root / name / str(version)
    shutil.copytree(root / name / "1", target)
    text = (target / MANIFEST_FILE).read_text()
    (target / MANIFEST_FILE).write_text(text.replace('"version": 1,', f'"version": {version},', 1))
    return target


class ServerThread:
    """``create_server(settings)`` served by an event loop on a thread of its own."""

    def __init__(self, settings, wait_ready: bool = True):
        from vaeserve.server.app import create_server

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vaeserve-test-loop")
        self._thread.start()

        async def start():
            server, port = await create_server(settings)
            await server.start()
            if wait_ready:
                await server.wait_ready()
            return server, port

        try:
            self.server, self.port = self.call(start())
        except BaseException:
            self._close()
            raise
        self.address = f"127.0.0.1:{self.port}"

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return self.submit(coroutine).result(WAIT_S)

    def stop(self, grace_s: float | None = 0.0) -> None:
        try:
            self.call(self.server.stop(grace_s))
        finally:
            self._close()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_S)
        self._loop.close()


def channel(address: str) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    return grpc.insecure_channel(address, options=options)


def array(tensor: pb.Tensor) -> np.ndarray:
    """A wire tensor as numpy, decoded independently of the server's own codec."""
    return np.frombuffer(tensor.data, dtype=np.dtype(_NP[tensor.dtype]).newbyteorder("<")).reshape(
        tuple(tensor.shape)
    )


def tensor(x: np.ndarray) -> pb.Tensor:
    wire = {np.float32: pb.FLOAT32, np.float16: pb.FLOAT16, np.int64: pb.INT64}[x.dtype.type]
    return pb.Tensor(dtype=wire, shape=x.shape, data=x.tobytes())


class Reference:
    """One version's graphs in a plain onnxruntime session: what the server must answer."""

    def __init__(self, version_dir: Path):
        self.manifest = m = load_version_manifest(version_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1

        def open_(file: str) -> ort.InferenceSession:
            return ort.InferenceSession(
                str(version_dir / file), options, providers=["CPUExecutionProvider"]
            )

        self._encoder, self._decoder = open_(m.encoder.file), open_(m.decoder.file)
        self.prior_means = None if m.prior_means is None else np.array(m.prior_means, np.float32)

    def _run(self, session, inputs, labels, takes_label) -> dict[str, np.ndarray]:
        if takes_label:
            inputs["y"] = np.asarray(labels, dtype=np.int64)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs), strict=True))

    def encode(self, x, labels=None) -> dict[str, np.ndarray]:
        return self._run(self._encoder, {"x": x}, labels, self.manifest.encoder_takes_label)

    def decode_params(self, z, labels=None) -> dict[str, np.ndarray]:
        return self._run(self._decoder, {"z": z}, labels, self.manifest.decoder_takes_label)

    def decode(self, z, labels=None, draw=False, seed=0, start=0) -> np.ndarray:
        params = self.decode_params(z, labels)
        if not draw:
            return params[self.manifest.mean_output]
        m = self.manifest
        return sampling.draw_from_likelihood(m.likelihood, params, seed, start, m.gaussian_sigma)

    def sample(self, seed, start, n, labels=None, temperature=1.0, draw=False):
        """(x, z) of samples start..start+n-1 of ``seed``."""
        z = sampling.prior_latents(
            self.manifest.latent_dim,
            seed,
            start,
            n,
            temperature,
            labels=labels,
            prior_means=self.prior_means,
        )
        return self.decode(z, labels, draw, seed, start), z


class SlowManifest:
    """A version whose manifest.json is a FIFO: loading blocks until the test feeds it.

    This holds a server in its loading phase for as long as a test needs, with no hook in
    the server: it simply reads a file that is slow to arrive.
    """

    def __init__(self, source: Path, repository: Path):
        target = repository / source.parent.name / source.name
        shutil.copytree(source, target)
        self.text = (target / MANIFEST_FILE).read_text()
        self.path = target / MANIFEST_FILE
        self.path.unlink()
        os.mkfifo(self.path)

    def feed(self) -> None:
        """Answer the loader's read of the manifest (blocks until it reads)."""
        with open(self.path, "w") as f:
            f.write(self.text)

    def feed_in_background(self) -> threading.Thread:
        """Feed the loader whenever it reads, without blocking the caller; see ``release``."""
        writer = threading.Thread(target=self.feed, name="slow-manifest", daemon=True)
        writer.start()
        return writer

    def release(self, writer: threading.Thread) -> None:
        """End a ``feed_in_background`` writer whether or not the loader ever read."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # lets a waiting writer open
        try:
            writer.join(WAIT_S)
        finally:
            os.close(fd)
