"""flip.compat against the installed libraries: each private name it holds is exercised for real.

- `wait_at_barrier`: two processes of a real `jax.distributed` runtime on loopback, one arriving
  seconds late; the other must have waited for it (measured on its own clock). Without a
  distributed client (this process) it returns at once.
- t5x's checkpoint layout: a tiny train state saved by t5x's own `Checkpointer` with a `tf.data`
  iterator, as the training loop saves; the names on disk, the temporary directory the array
  writer (`T5X_ARRAY_WRITER`) is called with, and t5x's own `latest_step` are the references.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax.linen import partitioning as nn_partitioning
from t5x import checkpoints as t5x_checkpoints
from t5x import optimizers as t5x_optimizers
from t5x import partitioning as t5x_partitioning
from t5x import train_state as t5x_train_state

from flip import checkpoints
from flip import compat

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LATE_SECONDS = 4.0

_BARRIER_PROGRAM = """
import sys, time
import jax
from flip import compat
port, process_id, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id)
compat.wait_at_barrier("compat_test_start", 120)
time.sleep(delay)
start = time.monotonic()
compat.wait_at_barrier("compat_test_late", 120)
print(f"waited {time.monotonic() - start:.3f}")
jax.distributed.shutdown()
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_wait_at_barrier_without_a_distributed_client_returns_at_once():
  assert jax.process_count() == 1
  start = time.monotonic()
  compat.wait_at_barrier("no_client", 1)
  assert time.monotonic() - start < 0.5


def test_wait_at_barrier_waits_for_the_late_process():
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _BARRIER_PROGRAM, str(port), str(i),
                             str(LATE_SECONDS if i == 1 else 0.0)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  waited = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    waited.append(float(out.split()[-1]))
  # Process 0 arrived LATE_SECONDS before process 1, so it waited about that long; process 1 not.
  assert waited[0] > 0.6 * LATE_SECONDS, waited
  assert waited[1] < 0.5 * LATE_SECONDS, waited


def _tiny_state(step: int):
  params = {"dense": {"kernel": np.arange(16, dtype=np.float32).reshape(2, 8)}}
  axes = {"dense": {"kernel_axes": nn_partitioning.AxisMetadata(names=("embed", "mlp"))}}
  state = t5x_train_state.FlaxOptimTrainState.create(
      t5x_optimizers.OptaxWrapper(optax.sgd(0.1)), {"params": params, "params_axes": axes})
  return state.replace_step(np.asarray(step, np.int32))


def test_t5x_checkpoint_layout(tmp_path, monkeypatch):
  step = 3
  workdir = str(tmp_path)
  writer = getattr(t5x_checkpoints.Checkpointer, compat.T5X_ARRAY_WRITER)
  seen = {}

  def recording_writer(self, ckpt_dir, train_state, *args, **kwargs):
    seen["dir"] = str(ckpt_dir)
    seen["step"] = int(train_state.step)
    return writer(self, ckpt_dir, train_state, *args, **kwargs)

  monkeypatch.setattr(t5x_checkpoints.Checkpointer, compat.T5X_ARRAY_WRITER, recording_writer)
  iterator = iter(tf.data.Dataset.range(10))
  next(iterator)
  state = _tiny_state(step)
  partitioner = t5x_partitioning.PjitPartitioner(num_partitions=1)
  t5x_checkpoints.Checkpointer(state, partitioner, workdir, dataset_iterator=iterator).save(state)

  # The array writer ran in the temporary directory of this step's save.
  tmp_name = os.path.basename(seen["dir"])
  match = compat.T5X_TMP_CHECKPOINT_DIR_RE.match(tmp_name)
  assert match and int(match.group(1)) == step and seen["step"] == step, tmp_name
  assert tmp_name.startswith(compat.t5x_checkpoint_dir_name(step) + ".tmp-")
  assert not os.path.exists(seen["dir"])  # renamed into place

  # The finalised directory, its msgpack file and the iterator state, as t5x named them.
  assert os.listdir(workdir) == [compat.t5x_checkpoint_dir_name(step)]
  assert compat.T5X_CHECKPOINT_DIR_RE.match(compat.t5x_checkpoint_dir_name(step)).group(1) == "3"
  ckpt_dir = os.path.join(workdir, compat.t5x_checkpoint_dir_name(step))
  names = sorted(os.listdir(ckpt_dir))
  assert compat.T5X_CHECKPOINT_FILE in names
  iterator_state = compat.t5x_iterator_state_name(0, 1)
  assert iterator_state + compat.TF_CHECKPOINT_INDEX_SUFFIX in names, names
  assert [n for n in names if n.startswith(compat.T5X_ITERATOR_STATE_PREFIX + "-")
          and not n.startswith(iterator_state + ".")] == [], names
  # t5x's own reading of the workdir agrees, and so does flip.checkpoints (built on the names).
  assert t5x_checkpoints.latest_step(workdir) == step
  assert checkpoints.complete_steps(workdir) == [step]
  assert checkpoints.iterator_state_names(ckpt_dir) == [iterator_state]
  assert checkpoints.has_iterator_state(ckpt_dir, 0, 1)

  # t5x restores the iterator's position from it (one element was consumed before the save).
  restored = iter(tf.data.Dataset.range(10))
  t5x_checkpoints.Checkpointer(state, partitioner, workdir, dataset_iterator=restored).restore(
      path=ckpt_dir)
  assert int(next(restored)) == 1


def test_iterator_state_name_pads_shard_numbers():
  assert compat.t5x_iterator_state_name(1, 12) == "train_ds-001-of-012"
  assert compat.T5X_TMP_CHECKPOINT_DIR_RE.match("checkpoint_7.tmp-1712345678")
  assert not compat.T5X_TMP_CHECKPOINT_DIR_RE.match("checkpoint_7")
  assert not compat.T5X_CHECKPOINT_DIR_RE.match("checkpoint_7.tmp-1712345678")


# Another library's private names: jax's internals, t5x partitioner attributes, t5x's checkpointer
# method (compat.T5X_ARRAY_WRITER), and flip's own private names reached from bench scripts.
_PRIVATE_USE = re.compile(r"jax\._src|\._(model_parallel_submesh|ici_mesh_shape|dcn_mesh_shape)\b"
                          r"|self\._(backend|num_partitions)\b|_write_state_to_tensorstore"
                          r"|losses\._[a-z]|trainer\._p_train_step")
_SOURCES = sorted(str(p.relative_to(REPO_ROOT)) for d in ("flip", "bench", "scripts")
                  for p in (REPO_ROOT / d).rglob("*.py")) + ["main.py"]


@pytest.mark.parametrize("path", [p for p in _SOURCES if p != "flip/compat.py"])
def test_no_private_names_outside_compat(path):
  text = (REPO_ROOT / path).read_text()
  assert not _PRIVATE_USE.search(text), (path, _PRIVATE_USE.search(text).group(0))
