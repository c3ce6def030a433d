"""Every ```python block of the README and its moved pages runs on its own, in a fresh interpreter.

A reader copies one block, not the page: each block carries its own imports.
The blocks that build a mesh run on 8 simulated CPU devices, and the
multi-host block runs as the single process of a one-task SLURM job, which
``jax.distributed.initialize()`` detects by itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# Long (a fresh interpreter or several devices per case): run by .ci/run with -m slow.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The README and the pages its experiments, numerics and scaling-out sections moved to.
PAGES = [ROOT / "README.md"] + [
  ROOT / "docs" / f"{name}.md"
  for name in (
    "thresholds-and-spikes",
    "language-model",
    "privacy",
    "numerics",
    "scaling-out",
    "examples",
  )
]
BLOCKS = [
  block
  for page in PAGES
  for block in re.findall(r"^```python\n(.*?)^```$", page.read_text(), re.S | re.M)
]

# A one-process SLURM job: what jax.distributed.initialize() finds on a cluster.
SLURM = {
  "SLURM_JOB_ID": "1",
  "SLURM_NTASKS": "1",
  "SLURM_PROCID": "0",
  "SLURM_LOCALID": "0",
  "SLURM_STEP_NODELIST": "localhost",
}


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 8


def run_block(block: str, tmp_path: Path) -> subprocess.CompletedProcess:
  """``python -c block`` from an empty folder; 8 CPU devices only where a block uses a mesh."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  if "make_mesh" in block:  # a multi-device compile costs seconds: only where it is shown
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["XLA_FLAGS"] = flags
  if "jax.distributed.initialize()" in block:
    env.update(SLURM)
  return subprocess.run(
    [sys.executable, "-c", block],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
    cwd=tmp_path,  # nothing from the repository root but the installed packages
  )


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory) -> list[subprocess.CompletedProcess]:
  """All blocks at once: each waits mostly on its own interpreter start and compile."""
  folder = tmp_path_factory.mktemp("blocks")
  with ThreadPoolExecutor(max_workers=4) as pool:
    return list(pool.map(lambda block: run_block(block, folder), BLOCKS))


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_block_runs_on_its_own(index, block_runs):
  proc = block_runs[index]
  assert proc.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"
