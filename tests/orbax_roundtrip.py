"""One Orbax save and restore of an optimizer state, shared by the checkpoint tests."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chex
import jax
import numpy as np
import optax


def save_and_restore(ocp: Any, state: Any, directory: Path) -> Any:
  """``state`` written with Orbax's StandardCheckpointer and read back against its own shapes."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "opt_state", state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return checkpointer.restore(directory / "opt_state", abstract)


def assert_resumes_identically(
  ocp: Any,
  tx: optax.GradientTransformation,
  stream: Sequence[Any],
  params: Any,
  directory: Path,
  **extra_args: Any,
) -> Any:
  """Runs ``tx`` over all of ``stream`` but its last gradients, checkpoints, and resumes.

  Asserts that the restored state has the state's structure and statistics, and
  that the last step from it gives bit-identical updates and state without a
  second trace (the state is committed to a device, as Orbax restores it).
  ``extra_args`` go to every ``update`` (``attention_logits=`` for QK-Clip).
  Returns the state before the last step.
  """
  import clipx  # the test's package, imported where it is used

  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(tx.update, n=1))
  state = jax.device_put(jax.jit(tx.init)(params), jax.devices()[0])
  for grads in stream[:-1]:
    _, state = update(grads, state, params, **extra_args)
  restored = save_and_restore(ocp, state, directory)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  np.testing.assert_equal(clipx.stats(restored).as_dict(), clipx.stats(state).as_dict())
  expected = update(stream[-1], state, params, **extra_args)
  got = update(stream[-1], restored, params, **extra_args)
  chex.assert_trees_all_equal(got, expected)
  return state
