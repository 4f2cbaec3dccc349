"""Where vae-score's numbers come from: the in-process engine (``--local``) or a server's
Score RPC (``--server``), behind one small interface, both pinned to one model version."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from vaeserve.client.arguments import TOKEN_ENV
from vaeserve.client.score_summary import SCORES
from vaeserve.errors import ServerError
from vaeserve.info import ModelInfo

__all__ = ["LocalScorer", "Scorer", "ServedScorer"]


class Scorer(Protocol):
    info: ModelInfo

    def score(
        self, x: np.ndarray, y: np.ndarray | None, k: int, seed: int, start: int
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class LocalScorer:
    """``--local REPO``: the engine in-process (onnxruntime on the CPU), as vae-generate --local."""

    def __init__(self, repository: Path, name: str, version: int):
        from vaeserve.engine import Engine, sampling
        from vaeserve.info import Limits, model_info
        from vaeserve.manifest import list_versions

        self.engine = e = Engine.open(repository, name, version, "cpu")
        big = sampling.MAX_ROW_INDEX
        limits = Limits(big, big, 2**63 - 1, big, big, big, big, big)
        versions = list_versions(Path(repository) / name)
        self.info = model_info(e.manifest, e.manifest_json, e.provider, versions, limits)

    def score(
        self, x: np.ndarray, y: np.ndarray | None, k: int, seed: int, start: int
    ) -> dict[str, np.ndarray]:
        s = self.engine.score(x, labels=y, k=k, seed=seed, start=start)
        return {name: np.asarray(getattr(s, name), dtype=np.float64) for name in SCORES}

    def close(self) -> None:
        pass


class ServedScorer:
    """``--server ADDR``: the Score RPC through VaeClient (retries while the server is away)."""

    def __init__(self, args: argparse.Namespace, name: str, version: int):
        from vaeserve.client.client import VaeClient
        from vaeserve.client.retry import RetryPolicy

        self.client = VaeClient(
            args.server,
            tls=args.tls or args.ca_cert is not None,
            root_certificates=None if args.ca_cert is None else args.ca_cert.read_bytes(),
            token=args.token or os.environ.get(TOKEN_ENV),
            timeout_s=args.timeout,
            retry=RetryPolicy(max_attempts=None, max_backoff_s=2.0, deadline_s=args.retry_timeout),
        )
        self.name = name
        try:
            self.info = self.client.model_info(name, version)
        except BaseException:
            self.client.close()
            raise

    def score(
        self, x: np.ndarray, y: np.ndarray | None, k: int, seed: int, start: int
    ) -> dict[str, np.ndarray]:
        r = self.client.score(
            self.name, x, version=self.info.version, labels=y, k=k, seed=seed, start_index=start
        )
        if r.model_version != self.info.version:
            raise ServerError(
                f"the server answered with version {r.model_version} of {self.name!r}, not the "
                f"pinned {self.info.version}"
            )
        return {name: getattr(r, name) for name in SCORES}

    def close(self) -> None:
        self.client.close()
