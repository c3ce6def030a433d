"""PyTorch's optimizer step on the ResNet-50-shaped tree, timed in a process of its own.

Started by ``run.py`` (see ``remote.py``) with the thread setting of the JAX
process it is compared with: ``SGD(foreach=True)`` with momentum, alone and
after ``clip_grad_norm_(..., foreach=True)``, on the same parameters and
gradients as the JAX rows (``trees.random_tree``, same seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import threads  # noqa: E402

SETTING = threads.from_environment()
threads.pin(SETTING)  # before torch is imported

import remote  # noqa: E402
import trees  # noqa: E402


def make_cases(args: argparse.Namespace):
  import torch

  threads.configure_torch(torch, SETTING)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  shapes = trees.benchmark_shapes(args.quick)
  grads = trees.random_tree(shapes, seed=1)
  cases = {}
  for name, clip in (("torch SGD(foreach) alone", False), ("torch clip_grad_norm_ + SGD", True)):
    params = []
    for key, value in trees.random_tree(shapes, seed=0, scale=0.05).items():
      p = torch.nn.Parameter(torch.from_numpy(value).to(dtype))
      p.grad = torch.from_numpy(grads[key]).to(dtype)
      params.append(p)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, foreach=True)

    def step(params=params, optimizer=optimizer, clip=clip):
      if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
      optimizer.step()  # eager CPU: finished when it returns

    cases[name] = step
  info = f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"
  return cases, info


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--momentum", type=float, required=True)
  args = parser.parse_args()
  remote.serve(lambda: make_cases(args))


if __name__ == "__main__":
  main()
