"""Shared fixtures: tiny generated image folders, so tests need no downloads."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

CLASS_COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
"""The fixture's classes (sorted order = label order) and the colour of their images."""


def write_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int], mode: str = "RGB") -> Path:
    """Save a solid-colour image of ``size`` (W, H); the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    if mode != "RGB":
        img = img.convert(mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    img.save(path, format=fmt)
    return path


def child_pids(pid: int) -> list[int]:
    """PIDs of the direct child processes of ``pid`` (Linux /proc): the decoding workers of a real run."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def console_script() -> str:
    """The installed ``simclrv2`` command (on PATH or beside this Python); skips the test when it is missing."""
    exe = shutil.which("simclrv2")
    if exe is None:
        candidate = Path(sys.executable).with_name("simclrv2")
        if not candidate.is_file():
            pytest.skip("the simclrv2 console script is not installed")
        exe = str(candidate)
    return exe


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``ROOT/train/<class>/*`` (4 images) and ``ROOT/test/<class>/*`` (2) for 3 classes.

    Extensions come in mixed case (``.png``, ``.JPG``, ``.Png``, ``.jpeg``), sizes and
    aspect ratios differ, one image per class is grayscale, and file names are unique
    across classes (``<class><i>.<ext>``) like ImageNet's.
    """
    root = tmp_path / "folder"
    for name, colour in CLASS_COLOURS.items():
        write_image(root / "train" / name / f"{name}0.png", (10, 6), colour)
        write_image(root / "train" / name / f"{name}1.JPG", (6, 10), colour)
        write_image(root / "train" / name / f"{name}2.Png", (8, 8), colour, mode="L")
        write_image(root / "train" / name / f"{name}3.jpeg", (16, 12), colour)
        write_image(root / "test" / name / f"{name}t0.jpg", (8, 8), colour)
        write_image(root / "test" / name / f"{name}t1.PNG", (12, 8), colour)
    return root


@pytest.fixture
def make_image():
    """The :func:`write_image` helper, for tests that build their own odd files."""
    return write_image


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's in-process training single-threaded: the 2 cores are shared with the
    processes the tests spawn, and one thread keeps fp32 results bit-exact across runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
