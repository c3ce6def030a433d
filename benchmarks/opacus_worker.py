"""Opacus's DP-SGD step on the digits CNN, timed in a process of its own.

Started by ``per_example.py`` (see ``remote.py``) with the thread setting of the
JAX process it is compared with. The net is ``examples/cnn.py``'s in PyTorch
(``GradSampleModule`` + ``DPOptimizer``), on the same batch (same seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import threads  # noqa: E402

SETTING = threads.from_environment()
threads.pin(SETTING)  # before torch is imported

import numpy as np  # noqa: E402
import remote  # noqa: E402

NAME = "Opacus (PyTorch)"


def batch(batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The benchmark's batch: NHWC images in [0, 1) and labels, seed 0 (as ``dp_cases.batch``)."""
  rng = np.random.default_rng(0)
  images = rng.random((batch_size, 8, 8, 1), np.float32)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  return images, labels


def make_cases(args: argparse.Namespace):
  import warnings

  import opacus
  import torch
  from opacus import GradSampleModule
  from opacus.optimizers import DPOptimizer

  threads.configure_torch(torch, SETTING)
  warnings.filterwarnings("ignore")
  torch.manual_seed(0)
  net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 64, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(64, 128, 3, padding=1),
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),
    torch.nn.Flatten(),
    torch.nn.Linear(512, 10),
  )
  model = GradSampleModule(net)
  optimizer = DPOptimizer(
    torch.optim.SGD(model.parameters(), lr=args.lr),
    noise_multiplier=args.noise,
    max_grad_norm=args.max_norm,
    expected_batch_size=args.batch_size,
  )
  images, labels = batch(args.batch_size)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
  y = torch.from_numpy(labels.astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()

  step()  # warm up
  info = (
    f"Opacus {opacus.__version__}, torch {torch.__version__}"
    f" ({torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op threads)"
  )
  return {NAME: step}, info


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, required=True)
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--noise", type=float, required=True)
  parser.add_argument("--max-norm", type=float, required=True)
  args = parser.parse_args()
  remote.serve(lambda: make_cases(args))


if __name__ == "__main__":
  main()
