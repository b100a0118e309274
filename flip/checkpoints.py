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
  (recomputed for sin-cos, which is not a parameter; learned ones are interpolated bilinearly).
- `check_finite`: no non-finite value is ever written into a checkpoint.
"""

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging
from etils import epath
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from t5x import checkpoints as t5x_checkpoints

_CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
META_DIR = "flip_meta"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, reported in one line naming the path or keys."""


def checkpoint_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, f"checkpoint_{step}")


def complete_steps(workdir: str) -> List[int]:
  """Steps whose checkpoint directory is finalised (has its msgpack `checkpoint` file)."""
  path = epath.Path(workdir)
  if not path.exists():
    return []
  steps = []
  for child in path.iterdir():
    match = _CHECKPOINT_DIR_RE.match(child.name)
    if match and (child / "checkpoint").exists():
      steps.append(int(match.group(1)))
  return sorted(steps)


def latest_complete_step(workdir: str) -> Optional[int]:
  steps = complete_steps(workdir)
  return steps[-1] if steps else None


def meta_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, META_DIR, f"step_{step}.json")


def write_meta(workdir: str, step: int, meta: Mapping[str, Any]) -> None:
  """Atomically writes the sidecar for `step` (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(meta_path(workdir, step))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True, default=str))
  tmp.rename(path)


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


def check_finite(tree: Any, what: str) -> None:
  """Raises if any floating leaf holds NaN/Inf (before it could be written to disk)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/") if isinstance(
      tree, Mapping) else {"": tree}
  for key, value in flat.items():
    arr = np.asarray(jax.device_get(value)) if not isinstance(value, np.ndarray) else value
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
      raise FloatingPointError(f"refusing to checkpoint {what}: {key} holds non-finite values")


# --- pretrained parameters ----------------------------------------------------------------------

def find_checkpoint_dir(path: str) -> str:
  """`path` is a checkpoint_<step> dir or a workdir holding them; returns the newest complete one."""
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"checkpoint path does not exist: {path}")
  if (p / "checkpoint").exists():
    return str(p)
  step = latest_complete_step(path)
  if step is None:
    raise CheckpointError(f"no complete checkpoint_<step> directory in {path}")
  return checkpoint_dir(path, step)


def load_params_tree(path: str) -> Dict[str, Any]:
  """The `target` (parameters) of a t5x checkpoint as nested dicts of numpy arrays."""
  ckpt_dir = find_checkpoint_dir(path)
  contents = t5x_checkpoints.load_t5x_checkpoint(ckpt_dir)
  if "target" not in contents:
    raise CheckpointError(f"{ckpt_dir} holds no parameters ('target' missing)")
  return jax.tree.map(np.asarray, contents["target"])


def resize_learned_posemb(posemb: np.ndarray, new_grid: Tuple[int, int]) -> np.ndarray:
  """[1, gh*gw, D] learned table -> [1, nh*nw, D] by bilinear interpolation on the 2-D grid."""
  _, n, width = posemb.shape
  old = int(round(np.sqrt(n)))
  if old * old != n:
    raise CheckpointError(f"cannot resize a position embedding of {n} positions (not square)")
  grid = jnp.asarray(posemb.reshape(old, old, width))
  resized = jax.image.resize(grid, (new_grid[0], new_grid[1], width), method="bilinear")
  return np.asarray(resized).reshape(1, new_grid[0] * new_grid[1], width)


def match_params(loaded: Mapping[str, Any], target_shapes: Mapping[str, Any],
                 resize_posemb_keys: Tuple[str, ...] = ("pos_embedding",),
                 posemb_grid: Optional[Tuple[int, int]] = None,
                 source: str = "checkpoint") -> Dict[str, Any]:
  """Fits `loaded` params to the model's `target_shapes`, or raises naming every mismatch.

  A learned image position embedding whose length differs is resized to `posemb_grid`.
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
      if is_image_posemb and posemb_grid is not None and value.ndim == 3:
        value = resize_learned_posemb(value, posemb_grid)
      else:
        misshaped.append(f"{key} {tuple(value.shape)} vs {want}")
        continue
    out[key] = value.astype(flat_target[key].dtype)
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
  if misshaped:
    problems.append(f"mis-shaped {len(misshaped)} keys (e.g. {'; '.join(misshaped[:3])})")
  if problems:
    raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/")


def load_pretrained_params(path: str, target_shapes: Mapping[str, Any],
                           posemb_grid: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
  """Parameters from `config.pretrain_dir`, checked and fitted to the model."""
  ckpt_dir = find_checkpoint_dir(path)
  return match_params(load_params_tree(ckpt_dir), target_shapes, posemb_grid=posemb_grid,
                      source=ckpt_dir)
