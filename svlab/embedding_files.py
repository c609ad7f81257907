"""The files of embeddings (a float32 ``.npy`` and its ``_index.txt``) and the model paths given on a
command line: torch-free, so that the ONNX path of ``tools/extract.py`` and ``tools/verify.py`` uses
them without importing torch (``svlab.embedding`` re-exports them for the PyTorch path).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from svlab.config import resolve_path
from svlab.files import atomic_write


def cli_path(text: str) -> Path:
    """A path given on the command line: relative to the working directory if it exists there, else
    relative to the project folder (like config paths)."""
    here = resolve_path(text, base=Path.cwd())
    return here if here.exists() else resolve_path(text)


def index_path(out: Path) -> Path:
    """``emb.npy`` -> ``emb_index.txt``."""
    out = Path(out)
    return out.with_name(out.stem + "_index.txt")


def save_embeddings(out: Path, emb: np.ndarray, names: list[str]) -> Path:
    """Atomically write ``out`` (float32 .npy) and its index file (one name per row); returns the index path."""
    out = Path(out)

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(emb, dtype=np.float32))
    atomic_write(out, write_npy)
    idx = index_path(out)
    atomic_write(idx, lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names), encoding="utf-8"))
    return idx
