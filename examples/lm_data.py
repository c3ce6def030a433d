"""A byte-level text corpus every Python has: the standard library's own prose and code.

``build_corpus()`` joins the Python reference manual's topics
(``pydoc_data.topics``: English prose, the text ``help("if")`` prints) and a
pinned list of standard-library modules (``STDLIB_MODULES``, read from
``sysconfig.get_paths()["stdlib"]``; no ``test/``) into one byte string. No
download and no extra dependency, but the text changes between Python
versions, so the corpus carries its size and sha256, and every results file
records them. A listed module that is missing is a clear error naming it.

Each document is split 90/10: its first 90% of bytes go to training, the rest
to validation, so both halves hold prose and code in the same proportions.
Bytes are the tokens (vocabulary 256): no tokenizer. ``sample_windows``
draws training windows on the device, so a whole run can be one ``lax.scan``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

VOCAB_SIZE = 256
VALIDATION_FRACTION = 0.1
SEPARATOR = b"\n\x00\n"  # between documents: a byte that neither prose nor code holds

# Pure-Python modules present, as files at these paths, in CPython 3.10 to 3.13.
STDLIB_MODULES = (
  "abc.py",
  "argparse.py",
  "ast.py",
  "base64.py",
  "bisect.py",
  "calendar.py",
  "codecs.py",
  "collections/__init__.py",
  "configparser.py",
  "contextlib.py",
  "copy.py",
  "csv.py",
  "dataclasses.py",
  "difflib.py",
  "enum.py",
  "fractions.py",
  "functools.py",
  "gettext.py",
  "glob.py",
  "gzip.py",
  "heapq.py",
  "hmac.py",
  "inspect.py",
  "json/decoder.py",
  "json/encoder.py",
  "logging/__init__.py",
  "numbers.py",
  "operator.py",
  "pprint.py",
  "queue.py",
  "random.py",
  "shlex.py",
  "shutil.py",
  "statistics.py",
  "string.py",
  "subprocess.py",
  "textwrap.py",
  "threading.py",
  "tokenize.py",
  "traceback.py",
  "typing.py",
  "urllib/parse.py",
  "uuid.py",
  "warnings.py",
  "weakref.py",
)


class Corpus(NamedTuple):
  """Training and validation bytes (uint8 arrays) and where they came from."""

  train: np.ndarray
  validation: np.ndarray
  sha256: str  # of the whole corpus, train and validation in document order
  num_bytes: int
  num_documents: int
  python: str  # the interpreter whose standard library this is, e.g. "3.11.7"


def _documents(stdlib_dir: str, modules: tuple[str, ...]) -> list[bytes]:
  """The reference topics (sorted by name), then each listed module's source."""
  from pydoc_data import topics  # the text help() shows; ships with CPython

  documents = [topics.topics[name].encode("utf-8") for name in sorted(topics.topics)]
  missing = [name for name in modules if not os.path.isfile(os.path.join(stdlib_dir, name))]
  if missing:
    raise FileNotFoundError(
      f"lm_data: standard-library module(s) {', '.join(missing)} not found under"
      f" {stdlib_dir} (Python {sys.version.split()[0]}); the corpus needs every module in"
      " STDLIB_MODULES."
    )
  for name in modules:
    with open(os.path.join(stdlib_dir, name), "rb") as file:
      documents.append(file.read())
  return documents


def build_corpus(
  stdlib_dir: str | None = None, modules: tuple[str, ...] = STDLIB_MODULES
) -> Corpus:
  """The corpus of this interpreter's standard library, split 90/10 within each document."""
  stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
  documents = _documents(stdlib_dir, modules)
  whole = SEPARATOR.join(documents)
  train, validation = [], []
  for document in documents:
    cut = int(len(document) * (1 - VALIDATION_FRACTION))
    train.append(document[:cut])
    validation.append(document[cut:])
  as_array = lambda parts: np.frombuffer(SEPARATOR.join(parts), np.uint8)  # noqa: E731
  return Corpus(
    train=as_array(train),
    validation=as_array(validation),
    sha256=hashlib.sha256(whole).hexdigest(),
    num_bytes=len(whole),
    num_documents=len(documents),
    python=sys.version.split()[0],
  )


def unigram_bits_per_byte(train: np.ndarray, validation: np.ndarray) -> float:
  """Cross-entropy (bits per byte) on ``validation`` of the training bytes' frequencies.

  The baseline a model must beat: it knows which bytes are common, nothing of
  context. Add-one smoothing, so a byte unseen in training costs a finite amount.
  """
  counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
  log2_probs = np.log2(counts / counts.sum())
  return float(-np.mean(log2_probs[validation]))


def sample_windows(key: jax.Array, data: jax.Array, batch_size: int, length: int) -> jax.Array:
  """``batch_size`` random windows of ``length + 1`` bytes (inputs and next-byte targets)."""
  starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - length - 1)
  take = lambda start: jax.lax.dynamic_slice(data, (start,), (length + 1,))  # noqa: E731
  return jax.vmap(take)(starts)


def validation_windows(validation: np.ndarray, count: int, length: int) -> np.ndarray:
  """``count`` evenly spaced windows of ``length + 1`` bytes: a fixed validation set."""
  if len(validation) < length + 1:
    raise ValueError(f"lm_data: validation holds {len(validation)} bytes, fewer than {length + 1}")
  starts = np.linspace(0, len(validation) - length - 1, count).astype(np.int64)
  return np.stack([validation[s : s + length + 1] for s in starts])


def as_device(array: np.ndarray) -> jax.Array:
  """Bytes as int32 on the device (gathers and one-hot lookups want int32)."""
  return jnp.asarray(array, jnp.int32)
