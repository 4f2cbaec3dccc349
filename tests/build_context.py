"""The files an image build sees: the repository filtered by .dockerignore's allow-list."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_context(dest: Path) -> Path:
    """The files .dockerignore lets into the image build, copied to ``dest``."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pattern in allowed:
        for path in ROOT.glob(pattern):
            target = dest / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore)
            else:
                shutil.copy2(path, target)
    return dest
