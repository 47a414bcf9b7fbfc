"""Real text available offline everywhere: the Python standard library of the running interpreter.

Files are listed in sorted order and split by a hash of their path relative to the library
root, so the same file is held out on every machine and Python version (the training machine
and a user's laptop may run different interpreters).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from moaplan.errors import DataError

Split = Literal["train", "heldout"]

SUFFIXES = (".py", ".txt", ".rst")
HELDOUT_MODULUS = 20  # one file in twenty is held out for perplexity and evaluation filler
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MIN_CHARS = 100_000


@dataclass(frozen=True)
class TextCorpus:
    """Documents of one split joined by blank lines; ``chunk`` cuts random windows from it."""

    text: str
    files: tuple[str, ...]
    root: str

    def chunk(self, rng: np.random.Generator, n_chars: int) -> str:
        """``n_chars`` consecutive characters from a random offset (wrapping round the end)."""
        start = int(rng.integers(0, len(self.text)))
        piece = self.text[start : start + n_chars]
        while len(piece) < n_chars:
            piece += "\n\n" + self.text[: n_chars - len(piece) - 2]
        return piece[:n_chars]


def is_heldout(relpath: str) -> bool:
    return zlib.crc32(relpath.replace(os.sep, "/").encode()) % HELDOUT_MODULUS == 0


def stdlib_files(split: Split, root: str | None = None) -> list[Path]:
    """Sorted source and documentation files of the standard library in ``split``."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    picked = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(SUFFIXES):
                path = Path(dirpath, name)
                if is_heldout(str(path.relative_to(base))) == (split == "heldout"):
                    picked.append(path)
    return picked


@lru_cache(maxsize=4)
def stdlib_corpus(split: Split = "train", root: str | None = None) -> TextCorpus:
    """The text of one split, cached per process (reading the whole library takes ~0.3 s)."""
    files = stdlib_files(split, root)
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if len(text) < MIN_CHARS:
        raise DataError(
            f"the standard library at {root or sysconfig.get_paths()['stdlib']} holds only "
            f"{len(text)} characters of {split} text; this Python install lacks its sources"
        )
    base = root or sysconfig.get_paths()["stdlib"]
    return TextCorpus(text=text, files=tuple(str(p.relative_to(base)) for p in files), root=base)
