"""Read a PDF back the way a person would: render its pages (pdftoppm) and extract its text (pdftotext).

Both come with poppler-utils (``apt-get install poppler-utils``); tests that need them are skipped
with that instruction when the tools are missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

POPPLER = all(shutil.which(tool) for tool in ("pdftoppm", "pdftotext", "pdfinfo"))
needs_poppler = pytest.mark.skipif(not POPPLER, reason="needs poppler-utils (apt-get install poppler-utils)")


def page_count(pdf: Path) -> int:
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^Pages:\s+(\d+)", info, re.MULTILINE).group(1))


def render(pdf: Path, out_dir: Path, dpi: int = 30) -> list[np.ndarray]:
    """Every page as a grey-scale array in [0, 1], in page order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["pdftoppm", "-png", "-r", str(dpi), str(pdf), str(out_dir / "page")], check=True)
    files = sorted(out_dir.glob("page-*.png"), key=lambda p: int(p.stem.split("-")[-1]))
    return [imread(f)[..., :3].mean(axis=-1) for f in files]


def page_text(pdf: Path, page: int) -> str:
    """The text of one page (1-based) with all whitespace runs collapsed to one space."""
    text = subprocess.run(
        ["pdftotext", "-f", str(page), "-l", str(page), str(pdf), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return " ".join(text.split())


def squash(text: str) -> str:
    return " ".join(text.split())
