"""Print the requirements of one pyproject extra, for the image build's dependency layer.

    python deploy/requirements.py serve [--gpu] > serve.txt

The Dockerfile installs this list (under deploy/constraints-*.txt) before it copies any code,
so a code change, or an edit elsewhere in pyproject.toml, reuses the installed-packages layer.
``--gpu`` swaps onnxruntime for onnxruntime-gpu: both install the same ``onnxruntime`` module,
so an image must hold exactly one of them.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["extra_requirements", "main"]

_ONNXRUNTIME = re.compile(r"^onnxruntime(?=[\s<>=!~;\[]|$)")


def extra_requirements(pyproject: Path, extra: str, gpu: bool = False) -> list[str]:
    """The base dependencies plus those of ``extra``, in pyproject order, without duplicates.

    Raises:
        KeyError: ``extra`` is not an optional-dependencies group of ``pyproject``.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise KeyError(f"{pyproject}: no extra {extra!r} (have: {', '.join(sorted(extras))})")
    out: list[str] = []
    for req in [*project.get("dependencies", []), *extras[extra]]:
        req = _ONNXRUNTIME.sub("onnxruntime-gpu", req) if gpu else req
        if req not in out:
            out.append(req)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", help="optional-dependencies group, e.g. serve or train")
    parser.add_argument("--gpu", action="store_true", help="onnxruntime-gpu for onnxruntime")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    try:
        lines = extra_requirements(args.pyproject, args.extra, args.gpu)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
