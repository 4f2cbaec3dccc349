"""Throwaway TLS material for tests: a CA, a server certificate and a client certificate.

Made with the ``openssl`` command at test time (nothing secret is checked in). The server
certificate names ``localhost`` and ``127.0.0.1``, where the tests' servers listen. Imported by
test modules (not a test module itself).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Certs", "make_certs"]

_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


@dataclass(frozen=True)
class Certs:
    ca: Path  # signs both certificates below
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it alone must fail


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                   timeout=60)  # fmt: skip


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", *_CURVE, "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN=vaeserve test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", *_CURVE, "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=folder)  # fmt: skip
    return cert, key


def make_certs(folder: Path) -> Certs:
    """Write a CA and the certificates it signs into ``folder``; skips without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    other = _ca(folder, "other-ca")
    server = _leaf(
        folder,
        "localhost",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")  # fmt: skip
    return Certs(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0],
                 client_key=client[1], other_ca=other[0])  # fmt: skip
