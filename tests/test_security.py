"""TLS and bearer-token auth: the pieces, and (end to end) a served model behind them."""

from __future__ import annotations

import ast
import logging
import ssl
import urllib.request
from pathlib import Path

import grpc
import pytest
from client_fixtures import tiny_repository
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ops_fixtures import CVAE, DECODER, settings, wait_until
from serving_fixtures import ServerThread
from tls_certs import make_certs

from vaeserve.client.client import VaeClient
from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc
from vaeserve.proto.v1 import vaeserve_pb2 as vae_pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as vae_grpc
from vaeserve.server.security import read_token, server_credentials

TOKEN = "s3cr3t-token_for.tests"


def test_read_token_strips_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    path.chmod(0o600)
    assert read_token(path) == TOKEN


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "expected 1 to"), ("two words", "printable ASCII"), ("x" * 5000, "expected 1 to")],
    ids=["empty", "space", "too-long"],
)
def test_read_token_rejects_unusable_tokens(tmp_path, content, message):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_token(path)


def test_read_token_warns_about_a_shared_file_without_printing_it(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="vaeserve.server.security"):
        assert read_token(path) == TOKEN
    assert "readable by other users" in caplog.text
    assert TOKEN not in caplog.text


def test_missing_token_file_names_it(tmp_path):
    with pytest.raises(ValueError, match="auth token file .*missing"):
        read_token(tmp_path / "missing")


def test_credentials_need_pem_files(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="TLS certificate .*expected a PEM file"):
        server_credentials(tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(ValueError, match="TLS client CA .*cannot be read"):
        server_credentials(tmp_path / "key.pem", tmp_path / "key.pem", tmp_path / "nope.pem")


def _risky_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        found += [f"import {m}" for m in modules if m.split(".")[0] in _UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append(f"{func.id}()")
        if isinstance(func, ast.Attribute) and func.attr == "load":
            if isinstance(func.value, ast.Name) and func.value.id in ("np", "numpy"):
                if not _pickle_refused(node):
                    found.append("np.load()")  # unpickles object arrays unless told not to
    return found


def _pickle_refused(call: ast.Call) -> bool:
    """``np.load(..., allow_pickle=False)`` spelled out: numpy then refuses object arrays."""
    return any(
        k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
        for k in call.keywords
    )


_UNPICKLERS = frozenset({"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal",
                         "shelve", "torch"})  # fmt: skip


def test_the_server_reads_only_json_and_onnx():
    """Nothing in the server (or the manifest reader it uses) can unpickle a file: no pickle
    modules, no eval, and numpy's loader only with allow_pickle=False (a mixture prior's npz)."""
    root = Path(__file__).resolve().parents[1]
    sources = [
        *sorted((root / "server").glob("*.py")),
        *sorted((root / "vaeserve" / "manifest").glob("*.py")),
    ]
    offending = {
        str(path.relative_to(root)): uses for path in sources if (uses := _risky_uses(path))
    }
    assert not offending


# --- end to end: a served model behind TLS and a token ---

T = 30.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory, certs, token_file):
    """TLS (no client certificates) and a bearer token."""
    repository = tiny_repository(tmp_path_factory)
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
    server = ServerThread(settings(repository, **tls, auth_token_file=token_file, metrics_port=0))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual(tmp_path_factory, certs):
    """Mutual TLS: clients must show a certificate signed by the test CA."""
    repository = tiny_repository(tmp_path_factory)
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
    server = ServerThread(settings(repository, **tls, tls_client_ca=certs.ca))
    yield server
    server.stop()


def _secure(address: str, ca: Path, cert: Path | None = None, key: Path | None = None):
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )
    return grpc.secure_channel(address, creds)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _health(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T).status


def _metadata(ch: grpc.Channel, metadata=None):
    stub = oip_grpc.GRPCInferenceServiceStub(ch)
    return stub.ModelMetadata(oip_pb.ModelMetadataRequest(name=DECODER), timeout=T,
                              metadata=metadata)  # fmt: skip


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_a_client_with_the_ca_succeeds(secured, certs):
    with _secure(secured.address, certs.ca) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        assert _metadata(ch, _bearer(TOKEN)).name == DECODER


def test_a_client_without_the_ca_fails(secured, certs):
    with _secure(secured.address, certs.other_ca) as ch:
        assert _code(lambda: _health(ch)) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(secured.address) as ch:  # plaintext to a TLS port
        assert _code(lambda: _health(ch)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("metadata", [None, _bearer("wrong"), (("authorization", TOKEN),)],
                         ids=["missing", "wrong", "no-scheme"])  # fmt: skip
def test_calls_without_the_token_are_unauthenticated(secured, certs, metadata):
    with _secure(secured.address, certs.ca) as ch:
        assert _code(lambda: _metadata(ch, metadata)) == grpc.StatusCode.UNAUTHENTICATED
        typed = vae_grpc.VaeServiceStub(ch)
        call = typed.ListModels
        assert _code(lambda: call(vae_pb.ListModelsRequest(), timeout=T, metadata=metadata)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        stream = vae_pb.SampleStreamRequest(
            request=vae_pb.SampleRequest(model=vae_pb.ModelRef(name=CVAE), num_samples=2, label=1)
        )
        assert _code(lambda: list(typed.SampleStream(stream, timeout=T, metadata=metadata))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_health_stays_open(secured, certs):
    with _secure(secured.address, certs.ca) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        oip = oip_grpc.GRPCInferenceServiceStub(ch)
        assert oip.ServerLive(oip_pb.ServerLiveRequest(), timeout=T).live
        assert oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=T).ready
        # ModelReady names models: it needs the token like everything else
        ready = oip_pb.ModelReadyRequest(name=DECODER)
        assert _code(lambda: oip.ModelReady(ready, timeout=T)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_python_client_with_tls_and_token(secured, certs):
    with VaeClient(secured.address, root_certificates=certs.ca.read_bytes(), token=TOKEN) as c:
        assert {(m.name, m.version) for m in c.list_models()} >= {(CVAE, 1)}


def test_the_token_is_never_logged(secured, certs, caplog):
    with caplog.at_level(logging.DEBUG):
        with _secure(secured.address, certs.ca) as ch:
            _metadata(ch, _bearer(TOKEN))
            assert _code(lambda: _metadata(ch, _bearer(TOKEN + "x"))) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        # the server logs a call just after answering it, on its own thread
        wait_until(lambda: "UNAUTHENTICATED" in caplog.text, "the rejected call's log line")
    assert TOKEN not in caplog.text  # ...without the token, right or wrong


def test_metrics_are_served_over_https_with_the_same_certificate(secured, certs):
    url = f"127.0.0.1:{secured.server.metrics_port}/metrics"
    context = ssl.create_default_context(cafile=str(certs.ca))
    with urllib.request.urlopen(f"https://{url}", context=context, timeout=T) as answer:
        assert b"vaeserve_requests_total" in answer.read()
    with pytest.raises(OSError):  # plain HTTP to the TLS port
        urllib.request.urlopen(f"http://{url}", timeout=T)


def test_mutual_tls_needs_a_client_certificate(mutual, certs):
    with _secure(mutual.address, certs.ca, certs.client_cert, certs.client_key) as ch:
        assert _metadata(ch).name == DECODER
    with _secure(mutual.address, certs.ca) as ch:
        assert _code(lambda: _health(ch)) == grpc.StatusCode.UNAVAILABLE
