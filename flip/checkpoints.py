"""Checkpoints: t5x's `Checkpointer` for the train state and input iterator, plus what t5x lacks.

Why t5x's checkpointing rather than orbax directly: it is what FLIP runs on, it writes the
partitioned train state with tensorstore from every host in parallel, saves each host's `tf.data`
iterator beside the arrays (so a resumed run sees exactly the batches it would have seen), writes
into `checkpoint_<step>.tmp-<time>` and renames the directory only when everything is on disk (a
killed save leaves a `.tmp-` directory that restore never picks), keeps the last N, and stores
arrays as msgpack + tensorstore: restoring never unpickles code.

What this module adds:
- `latest_complete_step`: the newest `checkpoint_<step>` with its `checkpoint` file present; t5x's
  own `restore()` without a path refuses step 0 ("No checkpoints found"), so we always restore by
  path.
- A small JSON sidecar per step (`flip_meta/step_<step>.json`) with the samples seen so far and the
  config, written *before* the checkpoint is finalised: the latest complete checkpoint always has
  its meta. The samples seen let a run resumed with another batch size or `num_epochs` continue
  the learning-rate schedule from its true position in virtual epochs (flip.optim).
- `load_pretrained_params` (`config.pretrain_dir`): parameters only, for unmasked tuning and
  evaluation; the structure is checked against the model, naming missing, unexpected and
  mis-shaped keys; position embeddings are resized when the image size or patch grid changed
  (recomputed for sin-cos, which is not a parameter; learned ones are resampled as timm does,
  flip.models.posemb, the class token's row kept).
- `check_finite`: no non-finite value is ever written into a checkpoint. It checks every floating
  leaf of whatever it is given (the loop passes the whole train state: parameters, optimizer
  moments, flax mutables), on device for jax arrays, so arrays sharded over processes need no
  host gather.
- Crash safety around t5x's save. `remove_incomplete` deletes the `checkpoint_<step>.tmp-*`
  directories that killed or failed saves leave behind (restore never reads them; they only take
  space). `check_writable` probes a workdir before any compute. A save that fails (disk full,
  permissions) is reported as `CheckpointWriteError`, one line naming the step, the directory and
  the OS error, after removing its own temporary directory; the previous checkpoints are untouched
  because t5x prunes old checkpoints only after the new one is renamed into place.
- The input-iterator state per data shard: t5x names it `train_ds-<shard>-of-<num_shards>` (one
  per data-parallel process group). `has_iterator_state` tells the loop whether a checkpoint holds
  the state for the current layout; when it does not (a checkpoint from a run with another number
  of processes), the loop restores the train state and restarts the input pipeline (flip.train).

t5x's on-disk names (`checkpoint`, `checkpoint_<step>.tmp-*`, `train_ds-*`) come from flip.compat,
which tests them against a real t5x save.

Restoring never unpickles: the `checkpoint` file is msgpack (flax.serialization, whose only
extension types are arrays and complex numbers), arrays are tensorstore (zarr chunks + JSON
metadata), the iterator state is a TensorFlow checkpoint (protobuf + tensor bundle) and the
sidecar is JSON. tests/test_reliability.py restores under an audit hook that fails on
`pickle.find_class`, the event every unpickling of code goes through.
"""

import errno
import json
import os
import re
import uuid
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging
from etils import epath
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from t5x import checkpoints as t5x_checkpoints

from flip import compat
from flip import misfit
from flip import paths
from flip.models import posemb as posemb_lib

META_DIR = "flip_meta"
# t5x's layout (flip.compat): the iterator state's name prefix and its TF checkpoint index suffix.
ITERATOR_STATE_PREFIX = compat.T5X_ITERATOR_STATE_PREFIX
TF_CHECKPOINT_INDEX_SUFFIX = compat.TF_CHECKPOINT_INDEX_SUFFIX
# tensorstore's status text for a failed write ends in "[os_error_code='28']".
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
# OS errors a checkpoint write meets on full, read-only, quota-limited or failing storage.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                   errno.EIO)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, reported in one line naming the path or keys."""


class CheckpointWriteError(OSError):
  """A checkpoint (or a workdir probe) that could not be written, in one line."""


def checkpoint_dir(workdir: str, step: int) -> str:
  return paths.join(workdir, compat.t5x_checkpoint_dir_name(step))


def complete_steps(workdir: str) -> List[int]:
  """Steps whose checkpoint directory is finalised (has its msgpack `checkpoint` file)."""
  path = epath.Path(workdir)
  if not path.exists():
    return []
  steps = []
  for child in path.iterdir():
    match = compat.T5X_CHECKPOINT_DIR_RE.match(child.name)
    if match and (child / compat.T5X_CHECKPOINT_FILE).exists():
      steps.append(int(match.group(1)))
  return sorted(steps)


def latest_complete_step(workdir: str) -> Optional[int]:
  steps = complete_steps(workdir)
  return steps[-1] if steps else None


def incomplete_dirs(workdir: str, step: Optional[int] = None) -> List[str]:
  """t5x temporary directories (`checkpoint_<step>.tmp-<time>`) in workdir, of `step` if given."""
  path = epath.Path(workdir)
  if not path.exists():
    return []
  found = []
  for child in path.iterdir():
    match = compat.T5X_TMP_CHECKPOINT_DIR_RE.match(child.name)
    if match and (step is None or int(match.group(1)) == step):
      found.append(str(child))
  return sorted(found)


def remove_incomplete(workdir: str, step: Optional[int] = None) -> List[str]:
  """Deletes the temporary directories of killed or failed saves (process 0 only); returns them.

  Call it only when no save is running on `workdir` (at start-up, or after a failed save).
  """
  if jax.process_index() != 0:
    return []
  removed = incomplete_dirs(workdir, step)
  for path in removed:
    logging.warning("removing the incomplete checkpoint directory %s (a killed or failed save)",
                    path)
    try:
      paths.rmtree(path)
    except OSError as err:
      logging.warning("could not remove %s: %s", path, _os_error_text(err))
  return removed


def check_writable(workdir: str) -> None:
  """Creates workdir if needed and writes + deletes a probe file, or raises CheckpointWriteError."""
  probe = paths.join(workdir, f".write_probe-{jax.process_index()}-{uuid.uuid4().hex}")
  try:
    paths.makedirs(workdir)
    paths.write_bytes(probe, b"probe")
    paths.remove(probe)
  except OSError as err:
    raise CheckpointWriteError(
        f"workdir {workdir} is not writable: {_os_error_text(err)}") from None


def _os_error_text(err: BaseException) -> str:
  """`[Errno 28] No space left on device` style text, without paths, in one line."""
  if isinstance(err, OSError) and err.errno:
    if err.strerror and err.strerror != os.strerror(err.errno):  # a remote filesystem's message
      return " ".join(err.strerror.split())
    return f"[Errno {err.errno}] {os.strerror(err.errno)}"
  text = " ".join(str(err).split())
  return text or type(err).__name__


def describe_write_error(err: BaseException) -> str:
  """One line for an exception raised while writing a checkpoint (OSError, tf or tensorstore).

  tensorstore and TensorFlow wrap the OS error in their own exception with long paths inside the
  temporary directory; the OS error is what the user needs (`[Errno 28] No space left on device`),
  found from tensorstore's `os_error_code` or the OS's own text for the errors storage gives.
  """
  text = _os_error_text(err)
  if isinstance(err, OSError) and err.errno:
    return text
  code = _TENSORSTORE_OS_ERROR.search(text)
  if code:
    return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  for number in _STORAGE_ERRNOS:
    if os.strerror(number) in text:
      return f"[Errno {number}] {os.strerror(number)}"
  return f"{type(err).__name__}: {text}" if not text.startswith(type(err).__name__) else text


def iterator_state_name(shard_id: int, num_shards: int) -> str:
  """t5x's name of a data shard's iterator state (`train_ds-000-of-002`)."""
  return compat.t5x_iterator_state_name(shard_id, num_shards)


def iterator_state_names(ckpt_dir: str) -> List[str]:
  """The iterator states saved in a checkpoint directory, e.g. ["train_ds-000-of-002", ...]."""
  path = epath.Path(ckpt_dir)
  if not path.exists():
    return []
  return sorted(child.name[:-len(TF_CHECKPOINT_INDEX_SUFFIX)] for child in path.iterdir()
                if child.name.startswith(ITERATOR_STATE_PREFIX + "-")
                and child.name.endswith(TF_CHECKPOINT_INDEX_SUFFIX))


def has_iterator_state(ckpt_dir: str, shard_id: int, num_shards: int) -> bool:
  return iterator_state_name(shard_id, num_shards) in iterator_state_names(ckpt_dir)


def meta_path(workdir: str, step: int) -> str:
  return paths.join(workdir, META_DIR, f"step_{step}.json")


def write_meta(workdir: str, step: int, meta: Mapping[str, Any]) -> None:
  """Atomically writes the sidecar for `step` (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(meta_path(workdir, step))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True, default=str))
  tmp.replace(path)  # overwrites the sidecar a failed save of the same step left


def read_meta(workdir: str, step: int) -> Optional[Dict[str, Any]]:
  path = epath.Path(meta_path(workdir, step))
  if not path.exists():
    return None
  return json.loads(path.read_text())


def prune_meta(workdir: str) -> None:
  """Drops sidecars whose checkpoint is gone (t5x removed it, keep-last-N)."""
  if jax.process_index() != 0:
    return
  keep = set(complete_steps(workdir))
  meta_dir = epath.Path(workdir) / META_DIR
  if not meta_dir.exists():
    return
  for child in meta_dir.iterdir():
    match = re.match(r"^step_(\d+)\.json$", child.name)
    if match and int(match.group(1)) not in keep and int(match.group(1)) < max(keep, default=0):
      child.unlink()


def _leaf_name(path: Tuple[Any, ...]) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def nonfinite_leaves(tree: Any) -> List[str]:
  """Names ("a/b/kernel") of the floating leaves of a pytree that hold a NaN or an Inf.

  jax arrays are checked on their devices (one jitted reduction per leaf, results replicated),
  so sharded and multi-process arrays are never gathered to one host. In a multi-process run
  every process must call this together, like any computation on global arrays.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  device_names, device_leaves, bad = [], [], []
  for path, leaf in leaves:
    if isinstance(leaf, jax.Array):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        device_names.append(_leaf_name(path))
        device_leaves.append(leaf)
      continue
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      bad.append(_leaf_name(path))
  if device_leaves:
    finite = _all_finite_per_leaf(device_leaves)
    bad += [name for name, ok in zip(device_names, finite) if not bool(np.asarray(ok))]
  return sorted(bad)


@jax.jit
def _all_finite_per_leaf(leaves: List[jax.Array]) -> List[jax.Array]:
  return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def check_finite(tree: Any, what: str) -> None:
  """Raises FloatingPointError naming the first non-finite leaf (before it is written to disk)."""
  if isinstance(tree, Mapping):
    tree = flax.core.unfreeze(tree)
  bad = nonfinite_leaves(tree)
  if bad:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise FloatingPointError(f"refusing to checkpoint {what}: {bad[0]}{more} holds non-finite "
                             "values")


# --- pretrained parameters ----------------------------------------------------------------------

def find_checkpoint_dir(path: str) -> str:
  """`path` is a checkpoint_<step> dir or a workdir holding them; returns the newest complete one."""
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"checkpoint path does not exist: {path}")
  if (p / compat.T5X_CHECKPOINT_FILE).exists():
    return str(p)
  step = latest_complete_step(path)
  if step is None:
    raise CheckpointError(f"no complete checkpoint_<step> directory in {path}")
  return checkpoint_dir(path, step)


def read_checkpoint(ckpt_dir: str, lazy: bool = False) -> Dict[str, Any]:
  """t5x's `load_t5x_checkpoint` of one checkpoint_<step> directory, or a CheckpointError naming
  the directory when its files cannot be read (garbage or truncated msgpack, missing arrays).
  `lazy`: arrays as t5x LazyArrays, nothing read but the msgpack file and the array specs."""
  try:
    return t5x_checkpoints.load_t5x_checkpoint(ckpt_dir, lazy_parameters=lazy)
  except (OSError, ValueError, TypeError, KeyError) as err:
    reason = " ".join(str(err).split()) or type(err).__name__
    raise CheckpointError(f"cannot read the checkpoint {ckpt_dir}: {reason}") from None


def load_state_tree(path: str) -> Dict[str, Any]:
  """Everything a t5x checkpoint holds (`target` parameters, `flax_mutables`, optimizer state)
  as nested dicts of numpy arrays."""
  ckpt_dir = find_checkpoint_dir(path)
  contents = read_checkpoint(ckpt_dir)
  if "target" not in contents:
    raise CheckpointError(f"{ckpt_dir} holds no parameters ('target' missing)")
  return jax.tree.map(np.asarray, contents)


def load_params_tree(path: str) -> Dict[str, Any]:
  """The `target` (parameters) of a t5x checkpoint as nested dicts of numpy arrays."""
  return load_state_tree(path)["target"]


def resize_learned_posemb(posemb: np.ndarray, new_grid: Tuple[int, int],
                          num_prefix_tokens: int = 0) -> np.ndarray:
  """[1, prefix + gh*gw, D] learned table (square grid) -> [1, prefix + nh*nw, D], the prefix
  (class token) rows kept: timm's resampling (flip.models.posemb, antialiased bicubic)."""
  try:
    return posemb_lib.resample(posemb, new_grid, num_prefix_tokens)
  except posemb_lib.PosembError as err:
    raise CheckpointError(f"cannot resize the position embedding: {err}") from None


def _squeezed(shape) -> Tuple[int, ...]:
  return tuple(d for d in shape if d != 1)


def match_params(loaded: Mapping[str, Any], target_shapes: Mapping[str, Any],
                 resize_posemb_keys: Tuple[str, ...] = ("pos_embedding",),
                 posemb_grid: Optional[Tuple[int, int]] = None,
                 source: str = "checkpoint") -> Dict[str, Any]:
  """Fits `loaded` params to the model's `target_shapes`, or raises naming every mismatch.

  A learned image position embedding whose length differs is resized to `posemb_grid` (its rows
  beyond the grid's, a class token's, kept).
  """
  flat_loaded = traverse_util.flatten_dict(flax.core.unfreeze(loaded), sep="/")
  flat_target = traverse_util.flatten_dict(flax.core.unfreeze(target_shapes), sep="/")
  missing = sorted(set(flat_target) - set(flat_loaded))
  unexpected = sorted(set(flat_loaded) - set(flat_target))
  out, misshaped = {}, []
  for key in sorted(set(flat_target) & set(flat_loaded)):
    value, want = flat_loaded[key], tuple(flat_target[key].shape)
    if tuple(value.shape) != want:
      is_image_posemb = key.split("/")[-1] in resize_posemb_keys and key.startswith("img_encoder")
      resizable = (is_image_posemb and posemb_grid is not None and value.ndim == 3
                   and len(want) == 3 and want[1] >= posemb_grid[0] * posemb_grid[1])
      if resizable:
        value = resize_learned_posemb(value, posemb_grid,
                                      want[1] - posemb_grid[0] * posemb_grid[1])
      elif _squeezed(value.shape) == _squeezed(want):
        # Only singleton axes differ (a scalar logit scale saved before it became shape (1,)).
        value = np.reshape(value, want)
      else:
        misshaped.append(misfit.shape_mismatch(key, value.shape, want))
        continue
    out[key] = value.astype(flat_target[key].dtype)
  line = misfit.misfit_line(source, "the model", missing=missing, extra=unexpected,
                            misshaped=misshaped)
  if line:
    raise CheckpointError(line)
  return traverse_util.unflatten_dict(out, sep="/")


def load_pretrained_params(path: str, target_shapes: Mapping[str, Any],
                           posemb_grid: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
  """Parameters from `config.pretrain_dir`, checked and fitted to the model."""
  ckpt_dir = find_checkpoint_dir(path)
  return match_params(load_params_tree(ckpt_dir), target_shapes, posemb_grid=posemb_grid,
                      source=ckpt_dir)
