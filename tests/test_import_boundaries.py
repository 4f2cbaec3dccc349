"""The serving side never imports torch: every module of server/ and client/, in a fresh process.

A serving install (``pip install .[serve]``) or image has no torch; one stray import would
break it (and costs seconds of start-up where it is installed).
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

from vaeserve import client, server

FORBIDDEN = ("torch", "torchvision", "onnxscript")


def _modules(package) -> list[str]:
    names = (m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "__main__")
    return sorted(f"{package.__name__}.{name}" for name in names)


@pytest.mark.parametrize("package", [server, client], ids=lambda p: p.__name__)
def test_no_module_imports_torch(package):
    modules = _modules(package)
    assert modules, f"no modules found in {package.__name__}"
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(set({FORBIDDEN!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{package.__name__} imported {result.stdout.strip()}"


def test_the_serve_extra_does_not_depend_on_torch():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    project = pyproject["project"]
    serve = project["optional-dependencies"]["serve"] + project["dependencies"]
    assert not [d for d in serve if d.lower().startswith(FORBIDDEN)], serve
    assert project["scripts"]["vae-serve"] == "vaeserve.server.cli:main"
