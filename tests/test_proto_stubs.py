"""The committed stubs under vaeserve_proto/ are exactly what grpc_tools.protoc makes of proto/.

Regenerate them with `make proto`; never edit them by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
from grpc_tools import protoc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def _protos() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))


def test_generated_stubs_are_up_to_date(tmp_path):
    protos = _protos()
    assert protos, "no .proto files under proto/"
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *protos,
    ]
    assert protoc.main(args) == 0, "protoc failed"
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != _committed(ROOT / p)]
    assert not stale, f"stubs out of date with proto/ (run `make proto`): {stale}"


def _committed(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b"<missing>"
