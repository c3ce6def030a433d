"""examples/data.py: the loaders read files the tests write in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from examples import data  # noqa: E402

MNIST_STEMS = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array, written from the format spec."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_mnist(
  folder: Path,
  gz: bool,
  rng: np.random.Generator,
  dotted: bool = False,
  train: int = 6,
  test: int = 3,
) -> dict:
  """Random MNIST-format files (``train``/``test`` images); returns the arrays written."""
  arrays = {
    "x_train": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
    "y_train": rng.integers(0, 10, train, dtype=np.uint8),
    "x_test": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
    "y_test": rng.integers(0, 10, test, dtype=np.uint8),
  }
  folder.mkdir(parents=True, exist_ok=True)
  for key, stem in MNIST_STEMS.items():
    name = stem.replace("-idx", ".idx") if dotted else stem
    raw = idx_bytes(arrays[key])
    if gz:
      with gzip.open(folder / (name + ".gz"), "wb") as f:
        f.write(raw)
    else:
      (folder / name).write_bytes(raw)
  return arrays


def write_cifar(folder: Path, rng: np.random.Generator) -> dict:
  folder.mkdir(parents=True, exist_ok=True)
  batches = {}
  for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
    rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 2).tolist()
    batches[name] = (rows, labels)
    with open(folder / name, "wb") as f:
      pickle.dump({b"data": rows, b"labels": labels, b"batch_label": name.encode()}, f)
  return batches


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
  rng = np.random.default_rng(0)
  arrays = write_mnist(tmp_path, gz, rng)
  x_train, y_train, x_test, y_test = data.load_dataset("mnist", tmp_path)
  assert x_train.shape == (6, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  np.testing.assert_allclose(x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
  np.testing.assert_allclose(x_test[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y_train, arrays["y_train"])
  np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_mnist_dotted_spelling(tmp_path):
  arrays = write_mnist(tmp_path, gz=True, rng=np.random.default_rng(1), dotted=True)
  _, y_train, _, _ = data.load_dataset("mnist", str(tmp_path))
  np.testing.assert_array_equal(y_train, arrays["y_train"])


def test_missing_mnist_file_is_named(tmp_path):
  write_mnist(tmp_path, gz=False, rng=np.random.default_rng(2))
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*--data-dir") as info:
    data.load_dataset("mnist", tmp_path)
  assert str(tmp_path) in str(info.value)


def test_empty_dir_names_the_first_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    data.load_dataset("mnist", tmp_path)
  with pytest.raises(FileNotFoundError, match="data_batch_1"):
    data.load_dataset("cifar10", tmp_path)


def test_malformed_idx_names_the_file(tmp_path):
  write_mnist(tmp_path, gz=False, rng=np.random.default_rng(3))
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-5])  # truncated data
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.*bytes"):
    data.load_dataset("mnist", tmp_path)
  path.write_bytes(b"\x12\x34\x08\x03")  # bad magic
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(path)


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10_pickles(tmp_path, subfolder):
  batches = write_cifar(tmp_path / subfolder, np.random.default_rng(4))
  x_train, y_train, x_test, y_test = data.load_dataset("cifar10", tmp_path)
  assert x_train.shape == (10, 32, 32, 3) and x_test.shape == (2, 32, 32, 3)
  assert x_train.dtype == np.float32 and y_test.dtype == np.int32
  # A row is 1024 red, 1024 green, 1024 blue values, each row-major over 32x32.
  rows, labels = batches["data_batch_3"]
  image, row = x_train[4 + 1], rows[1]  # batch 3 starts at index 4
  for h, w, c in [(0, 0, 0), (0, 1, 0), (1, 0, 1), (31, 17, 2), (5, 30, 1)]:
    assert image[h, w, c] == np.float32(row[c * 1024 + h * 32 + w] / 255.0)
  assert y_train[5] == labels[1]
  np.testing.assert_array_equal(y_test, batches["test_batch"][1])


def test_cifar10_bad_pickle(tmp_path):
  write_cifar(tmp_path, np.random.default_rng(5))
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(ValueError, match="test_batch.*3072"):
    data.load_dataset("cifar10", tmp_path)


def test_digits_split():
  x_train, y_train, x_test, y_test = data.load_dataset("digits")
  assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert 0.0 == min(x_train.min(), x_test.min()) and max(x_train.max(), x_test.max()) == 1.0
  # Stratified: every class is in the test set in its share (about 36 each).
  counts = np.bincount(y_test, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37
  # The split is fixed: loading again gives the same arrays.
  again = data.load_dataset("digits")
  np.testing.assert_array_equal(again[3], y_test)
  np.testing.assert_array_equal(again[0], x_train)
  # Train and test are disjoint samples of sklearn's 1797 digits.
  train_rows = {row.tobytes() + bytes([y]) for row, y in zip(x_train, y_train)}
  overlap = sum(row.tobytes() + bytes([y]) in train_rows for row, y in zip(x_test, y_test))
  assert overlap <= 5  # a handful of digits are exact duplicates in the source data


def test_unknown_name_and_shapes():
  with pytest.raises(ValueError, match="digits, mnist, cifar10"):
    data.load_dataset("imagenet")
  assert data.input_shape("cifar10") == (32, 32, 3)
  assert data.input_shape("mnist") == (28, 28, 1)
