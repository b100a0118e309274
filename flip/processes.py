"""What the processes of a multi-process run agree on: when to stop (signals), when to start
(a barrier and the first collectives), and the data skip counts summed over the data shards.

Every function here is called by every process at the same point of the loop; in a
single-process run each is a cheap local operation.
"""

import math
import signal
from typing import Dict, Mapping, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from flip import compat

# How long the processes of a multi-process run wait for each other before the first step
# (start-up, data listing and restore take what they take; this only bounds a process that never
# comes).
PROCESS_START_BARRIER_SECONDS = 3600


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then checkpoints, exits)."""

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.signal_number: Optional[int] = None
    self._previous = {}
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: checkpointing and stopping after this step", signum)
    self.requested = True
    self.signal_number = self.signal_number or signum

  def stop_agreed(self) -> bool:
    """Whether any process was asked to stop. Every process calls this once per step, so all of
    them leave the loop after the same step (a process that stopped alone would wait forever in
    the checkpoint's collective writes)."""
    if jax.process_count() == 1:
      return self.requested
    signals = multihost_utils.process_allgather(np.int32(self.signal_number or 0))
    received = [int(s) for s in np.ravel(signals) if s]
    if received and not self.requested:
      self.requested, self.signal_number = True, received[0]
      logging.warning("another process received signal %d: checkpointing and stopping",
                      received[0])
    return bool(received)

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def align_processes(mesh: jax.sharding.Mesh, name: str) -> None:
  """Multi-process runs: meet at a barrier, then open the collectives of the mesh together.

  XLA's CPU collectives (gloo) connect the processes of a group of devices the first time a
  program uses that group, and wait at most 30 s (fixed in XLA) for the others: a process that
  starts, restores or compiles the train step more than 30 s after another fails its first step
  with "Gloo context initialization failed: DEADLINE_EXCEEDED" (seen with 2 processes on a loaded
  2-core machine). Here all processes meet at a barrier of jax's coordination service (no such
  limit), then psum over every group the train step can use (all devices, and each mesh axis)
  while they are together, and all-gather across processes as `multihost_utils` does (the loop's
  stop agreement, checkpointing); later collectives wait for a late peer instead of failing.
  """
  if jax.process_count() == 1:
    return
  compat.wait_at_barrier(name, PROCESS_START_BARRIER_SECONDS)
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  ones = jax.make_array_from_callback(
      (mesh.size,), jax.sharding.NamedSharding(mesh, spec), lambda _: np.ones((1,), np.int32))
  groups = [tuple(mesh.axis_names)] + [(a,) for a in mesh.axis_names
                                       if 1 < mesh.shape[a] < mesh.size]
  for axes in groups:
    summed = jax.jit(jax.shard_map(lambda x, axes=axes: jax.lax.psum(x, axes), mesh=mesh,
                                   in_specs=spec, out_specs=spec))(ones)
    expected = math.prod(mesh.shape[a] for a in axes)
    if any(int(np.asarray(shard.data)[0]) != expected for shard in summed.addressable_shards):
      raise RuntimeError(f"collective check over mesh axes {axes} failed")
  gathered = multihost_utils.process_allgather(np.int32(jax.process_index()))
  if sorted(int(i) for i in np.ravel(gathered)) != list(range(jax.process_count())):
    raise RuntimeError(f"process all-gather check failed: {gathered}")


def skip_counts_over_shards(counts: Mapping[str, float], layout) -> Dict[str, float]:
  """The run's skip counts by reason: each data shard's input pipeline counts the records it read,
  so in a multi-process run the counts are summed over the shards (one process per data shard
  contributes, `layout.is_first_host_in_replica_set`). Every process calls this at the same step.
  """
  if jax.process_count() == 1 or not counts:
    return dict(counts)
  names = sorted(counts)
  # int32: jax without x64 would narrow int64; a shard skipping 2**31 records is not a real run.
  local = np.asarray([counts[n] if layout.is_first_host_in_replica_set else 0 for n in names],
                     np.int32)
  totals = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(names)).sum(0)
  return {name: float(total) for name, total in zip(names, totals)}
