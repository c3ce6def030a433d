"""Where the CNN examples put their arrays: one device, or a data-parallel mesh.

With more than one device the batch is sharded over a ``data`` mesh axis and
parameters and optimizer state are replicated; XLA inserts the all-reduces,
the scalar ones of the clipping norms included. The training script only asks
for ``placement.batch`` and ``placement.replicated``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


class Placement:
  """Where arrays live: one device, or a data-parallel mesh over all of them."""

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    devices = list(jax.devices() if devices is None else devices)
    self.count = len(devices)
    if self.count > 1:
      # jax 0.10's make_mesh defaults to explicit axes; Auto lets jit propagate
      # the batch sharding through the model without annotations.
      mesh = jax.make_mesh(
        (self.count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
      )
      self.batch = NamedSharding(mesh, P("data"))
      self.replicated = NamedSharding(mesh, P())
    else:
      self.batch = self.replicated = jax.sharding.SingleDeviceSharding(devices[0])

  def describe(self) -> str:
    """``1 device (cpu)`` or how the mesh splits the work, for logs and ``metrics.json``."""
    if self.count == 1:
      return f"1 device ({jax.devices()[0].platform})"
    return f"{self.count} devices, batch sharded over a 'data' mesh axis, params replicated"
