"""The parameter trees the benchmarks time, as numpy arrays that any framework can take."""

from __future__ import annotations

import numpy as np


def resnet50_shapes(width_divisor: int = 1) -> dict[str, tuple[int, ...]]:
  """Leaf shapes of ResNet-50 (HWIO conv kernels, BN scale/bias, fc): 161 leaves, 25.56M.

  ``width_divisor`` narrows every layer (for ``--quick``).
  """
  d = width_divisor
  shapes: dict[str, tuple[int, ...]] = {}

  def conv_bn(name, k, cin, cout):
    shapes[f"{name}/conv"] = (k, k, cin, cout)
    shapes[f"{name}/bn_scale"] = (cout,)
    shapes[f"{name}/bn_bias"] = (cout,)

  conv_bn("stem", 7, 3, 64 // d)
  cin = 64 // d
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    width //= d
    for block in range(blocks):
      name = f"stage{stage}/block{block}"
      conv_bn(f"{name}/a", 1, cin, width)
      conv_bn(f"{name}/b", 3, width, width)
      conv_bn(f"{name}/c", 1, width, 4 * width)
      if block == 0:
        conv_bn(f"{name}/proj", 1, cin, 4 * width)
      cin = 4 * width
  shapes["fc/kernel"] = (cin, 1000)
  shapes["fc/bias"] = (1000,)
  return shapes


def benchmark_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
  """The optimizer benchmark's tree: ResNet-50, or for ``--quick`` its stem and two convs.

  Truncated, it still has every kind of leaf and compiles in seconds.
  """
  if not quick:
    return resnet50_shapes()
  return dict(list(resnet50_shapes(16).items())[:9])


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0):
  """Standard normal float32 leaves times ``scale``; the same seed gives the same tree."""
  rng = np.random.default_rng(seed)
  return {k: scale * rng.standard_normal(s, np.float32) for k, s in shapes.items()}
