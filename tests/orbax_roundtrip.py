"""One Orbax save and restore of an optimizer state, shared by the checkpoint tests."""

from pathlib import Path
from typing import Any

import jax


def save_and_restore(ocp: Any, state: Any, directory: Path) -> Any:
  """``state`` written with Orbax's StandardCheckpointer and read back against its own shapes."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "opt_state", state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return checkpointer.restore(directory / "opt_state", abstract)
