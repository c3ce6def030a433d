"""Datasets for the examples: digits (no download), MNIST IDX files, CIFAR-10 pickles.

Stable API (other examples and tests import it):

- ``load_dataset(name, data_dir=None) -> (x_train, y_train, x_test, y_test)``:
  images are NHWC ``float32`` in ``[0, 1]``, labels ``int32`` class indices.

  - ``"digits"``: scikit-learn's ``load_digits`` (shipped with the package,
    1797 greyscale 8x8 images), split 80/20 stratified with a fixed seed:
    1437 train, 360 test, shape ``(n, 8, 8, 1)``. ``data_dir`` is ignored.
  - ``"mnist"``: the four IDX files from ``data_dir``, gzipped or not:
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each may end in
    ``.gz``; the ``train-images.idx3-ubyte`` spelling works too). Shape
    ``(n, 28, 28, 1)``.
  - ``"cifar10"``: the python pickle batches ``data_batch_1`` ..
    ``data_batch_5`` and ``test_batch``, in ``data_dir`` or in
    ``data_dir/cifar-10-batches-py`` (the folder ``cifar-10-python.tar.gz``
    unpacks to). Shape ``(n, 32, 32, 3)``.

  A missing file raises ``FileNotFoundError`` naming the file and the folders
  searched; a malformed one raises ``ValueError`` naming the file.
- ``input_shape(name)``: ``(height, width, channels)`` of one image, for
  ``cnn.CNN(input_shape=...)`` without loading the data.
- ``DATASETS``: the names ``load_dataset`` accepts.

``data_dir=None`` means the ``data`` folder under the current directory.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np

DATASETS = ("digits", "mnist", "cifar10")

_INPUT_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

_MNIST_FILES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def input_shape(name: str) -> tuple[int, int, int]:
  """``(height, width, channels)`` of one image of dataset ``name``."""
  _check_name(name)
  return _INPUT_SHAPES[name]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Arrays:
  """Loads ``name`` as ``(x_train, y_train, x_test, y_test)``; see the module docstring."""
  _check_name(name)
  if name == "digits":
    return _load_digits()
  folder = Path("data" if data_dir is None else data_dir).expanduser()
  if name == "mnist":
    return _load_mnist(folder)
  return _load_cifar10(folder)


def load_or_exit(name: str, data_dir: str | os.PathLike | None = None) -> Arrays:
  """:func:`load_dataset` for command-line scripts: a missing file exits with its message."""
  try:
    return load_dataset(name, data_dir)
  except FileNotFoundError as e:  # the message names the file and the folders searched
    raise SystemExit(f"error: {e}") from None


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")


def _load_digits() -> Arrays:
  # Imported here so MNIST/CIFAR users do not pay for scikit-learn.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  # Pixel values are integers 0..16.
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
  )
  return x_train, y_train, x_test, y_test


def _find(folders: list[Path], names: list[str], dataset: str) -> Path:
  for folder in folders:
    for name in names:
      if (folder / name).is_file():
        return folder / name
  searched = ", ".join(str(f) for f in folders)
  spellings = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
  raise FileNotFoundError(
    f"{dataset}: missing file {names[0]}{spellings}; searched {searched}."
    f" Download the {dataset} files and pass their folder with --data-dir"
    f" (load_dataset(..., data_dir=...))."
  )


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (gzipped when its name ends in ``.gz``) into a numpy array."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r}).")
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: IDX header truncated.")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  count = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != count:
    raise ValueError(
      f"{path}: IDX header says shape {shape} ({count} bytes) but the file holds"
      f" {len(raw) - header} bytes of data."
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _load_mnist(folder: Path) -> Arrays:
  arrays = {}
  for key, stem in _MNIST_FILES.items():
    dotted = stem.replace("-idx", ".idx")  # another common spelling
    names = [stem, stem + ".gz", dotted, dotted + ".gz"]
    arrays[key] = read_idx(_find([folder], names, "mnist"))
  out = []
  for split in ("train", "test"):
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(
        f"mnist {split}: expected images (n, h, w) and labels (n,), got"
        f" {images.shape} and {labels.shape}."
      )
    out += [(images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)]
  return tuple(out)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  # The official CIFAR-10 format is a pickle; only load files you trust.
  with open(path, "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  try:
    flat = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int32)
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a CIFAR-10 python batch (no b'data'/b'labels').") from e
  if flat.ndim != 2 or flat.shape[1] != 3072 or len(flat) != len(labels):
    raise ValueError(
      f"{path}: expected data (n, 3072) and n labels, got {flat.shape} and {labels.shape}."
    )
  # Rows are 1024 red, then green, then blue values of a 32x32 image (CHW).
  images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images.astype(np.float32) / 255.0, labels


def _load_cifar10(folder: Path) -> Arrays:
  folders = [folder, folder / "cifar-10-batches-py"]
  train = [_read_cifar_batch(_find(folders, [name], "cifar10")) for name in _CIFAR_TRAIN]
  x_test, y_test = _read_cifar_batch(_find(folders, [_CIFAR_TEST], "cifar10"))
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  return x_train, y_train, x_test, y_test
