"""Shared helpers for the partitioner, training-loop and checkpoint tests.

What lives here: a config smaller than the `:smoke` one (one block per tower, 4 patches, a
64-token vocabulary) with a learning rate large enough that a few steps move the parameters
visibly, deterministic in-memory tf.data datasets in the `make_dataset(config, shard, num_shards,
seed)` form that `flip.train.train_and_evaluate` accepts, readers for the scalars the loop writes
to its tensorboard event files, tree comparison helpers, trainer-level step runs with the
single-device plain-jit reference they are compared with, the float64 schedule formula and the lr
a step really applied (recovered from AdamW's update), and a switch for jax's persistent
compilation cache.

Why a compilation cache in tests: every `train_and_evaluate` call builds a new `Trainer`, so jax's
in-memory cache (keyed by function identity) never hits and each run recompiles the same train
step (10-30 s on 2 cores). The persistent cache is keyed by the lowered program, so a second run of
the same config loads the executable instead; the executable is the same, so results are too.
"""

import contextlib
import dataclasses
import functools
import glob
import math
import os
import pathlib
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import jax
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import tensorflow as tf

from flip import config as config_lib
from flip import optim
from flip import builders
from flip import train
from flip import trainer as trainer_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_CONFIG = f"{REPO_ROOT / 'configs' / 'cfg_flip_large.py'}:smoke"

# Smaller than `:smoke`: 16x16 images with 8x8 patches (4 tokens, 2 kept at mask_ratio 0.5), one
# transformer block per tower, widths divisible by data=4 and model=2. The base lr of 0.05 per 256
# (peak 3.1e-3 at batch 16) makes three steps change every parameter well above float32 rounding;
# the 1600-sample virtual epoch of `:smoke` is kept, so warmup (0.03 epoch) ends after 3 steps
# and the whole schedule (num_epochs 0.1) after 10 steps.
TINY_OVERRIDES = (
    "image_size=16",
    "model.model_img.hidden_size=32",
    "model.model_img.transformer.mlp_dim=64",
    "model.model_img.transformer.num_heads=2",
    "model.model_img.transformer.num_layers=1",
    "model.model_txt.hidden_size=32",
    "model.model_txt.transformer.mlp_dim=64",
    "model.model_txt.transformer.num_heads=2",
    "model.model_txt.transformer.num_layers=1",
    "model.model_txt.vocab_size=64",
    "aug.txt.max_len=8",
    "model.clr.proj_dim_out=16",
    "learning_rate=0.05",
    "warmup_epochs=0.03",
    "num_epochs=0.1",
    "eval_every_epochs=0",
    "log_every_steps=1",
)
BATCH_SIZE = 16  # `:smoke`
STEPS_PER_EPOCH = 100  # 1600 samples per virtual epoch / 16

# Distinct examples in the synthetic dataset (a multiple of every batch size used).
NUM_EXAMPLES = 64
# A caption made only of this token marks a batch a test wants to be non-finite.
POISON_TOKEN = 63


def tiny_config(*overrides: str):
  """The tiny config with extra `key=value` overrides (applied after TINY_OVERRIDES)."""
  return config_lib.load_config(SMOKE_CONFIG, list(TINY_OVERRIDES) + list(overrides))


def synthetic_examples(config, seed: int = 0) -> Dict[str, np.ndarray]:
  """NUM_EXAMPLES uint8 images and zero-padded captions of random length (ids 1..vocab-2)."""
  rng = np.random.RandomState(seed)
  size, max_len = config.image_size, config.aug.txt.max_len
  images = rng.randint(0, 256, (NUM_EXAMPLES, size, size, 3)).astype(np.uint8)
  tokens = rng.randint(1, POISON_TOKEN, (NUM_EXAMPLES, max_len)).astype(np.int32)
  lengths = rng.randint(2, max_len + 1, NUM_EXAMPLES)
  tokens[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
  return {"image": images, "txt": tokens}


def make_dataset(config, shard_index: int, num_shards: int, seed: int) -> tf.data.Dataset:
  """Shuffled (seeded, reshuffled every pass), repeated, batched: checkpointable and deterministic."""
  local_batch = config.batch_size // num_shards
  ds = tf.data.Dataset.from_tensor_slices(synthetic_examples(config))
  ds = ds.shard(num_shards, shard_index)
  ds = ds.shuffle(NUM_EXAMPLES, seed=seed, reshuffle_each_iteration=True).repeat()
  return ds.batch(local_batch, drop_remainder=True)


def poisoned_dataset_factory(poison_steps: Sequence[int], num_steps: int):
  """`make_dataset` whose batch for each 1-based step in `poison_steps` is all POISON_TOKEN."""
  poison = set(poison_steps)

  def make(config, shard_index, num_shards, seed):
    del seed
    batches = list(fixed_batches(config, num_steps))
    for step in poison:
      batches[step - 1]["txt"] = np.full_like(batches[step - 1]["txt"], POISON_TOKEN)
    local = config.batch_size // num_shards
    sl = slice(shard_index * local, (shard_index + 1) * local)
    stacked = {k: np.stack([b[k][sl] for b in batches]) for k in batches[0]}
    return tf.data.Dataset.from_tensor_slices(stacked)

  return make


def fixed_batches(config, num_steps: int) -> Iterator[Dict[str, np.ndarray]]:
  """`num_steps` global batches (numpy) in order, cycling through the synthetic examples."""
  examples = synthetic_examples(config)
  b = config.batch_size
  for step in range(num_steps):
    idx = np.arange(step * b, (step + 1) * b) % NUM_EXAMPLES
    yield {k: v[idx] for k, v in examples.items()}


def event_files(workdir: str) -> List[str]:
  """The tensorboard event files the loop wrote in `workdir`, oldest first (one per run)."""
  return sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")), key=os.path.getmtime)


def logged_scalars(path: str, tag: str) -> Dict[int, float]:
  """{step: value} of one scalar from an event file, or from every one in a workdir (later win)."""
  paths = event_files(path) if os.path.isdir(path) else [path]
  values = {}
  for events in paths:
    for event in tf.compat.v1.train.summary_iterator(events):
      for value in event.summary.value:
        if value.tag == tag:
          values[int(event.step)] = float(tf.make_ndarray(value.tensor))
  return values


def flat_tree(tree: Any) -> Dict[str, np.ndarray]:
  """{"a/b/c": host numpy array} for every leaf of a pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {"/".join(_key_name(k) for k in path): np.asarray(v) for path, v in leaves}


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Tuple[float, str]:
  """Largest |a - b| over all shared leaves, and the leaf where it occurs."""
  assert set(a) == set(b), set(a) ^ set(b)
  worst, where = 0.0, ""
  for key in a:
    diff = float(np.max(np.abs(a[key].astype(np.float64) - b[key].astype(np.float64)), initial=0))
    if diff > worst:
      worst, where = diff, key
  return worst, where


# The attention key bias (`qkv_bias[1]`, layout [q|k|v, heads, head_dim]) has an exact gradient
# of zero: adding one vector to every key shifts all logits of a query by the same constant, which
# softmax ignores. Computed gradients for it are rounding noise (~1e-10) that Adam normalises to
# updates of +-lr, so two correct computations of the same step disagree on it by up to lr.
KEY_BIAS_INDEX = 1


SEPARATE_KEY_BIAS_SUFFIX = "/key/bias"  # FLIP's separate q/k/v layout


def without_key_bias(flat: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """`flat` without the attention key biases (separate layout) and with the key-bias slice
  removed from every fused qkv bias."""
  return {k: np.delete(v, KEY_BIAS_INDEX, axis=0) if k.endswith("/qkv_bias") else v
          for k, v in flat.items() if not k.endswith(SEPARATE_KEY_BIAS_SUFFIX)}


def key_biases(flat: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  fused = {k: v[KEY_BIAS_INDEX] for k, v in flat.items() if k.endswith("/qkv_bias")}
  return {**fused, **{k: v for k, v in flat.items() if k.endswith(SEPARATE_KEY_BIAS_SUFFIX)}}


def key_name(key: Any) -> str:
  return _key_name(key)


def unequal_leaves(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> List[str]:
  """Names of the leaves that are not bitwise equal."""
  assert set(a) == set(b), set(a) ^ set(b)
  return sorted(k for k in a if not np.array_equal(a[k], b[k]))


@contextlib.contextmanager
def persistent_compilation_cache(cache_dir: str):
  """Enables jax's on-disk compilation cache in `cache_dir`, restoring the settings afterwards."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # the cache is set up once per process: re-read the settings
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


# --- trainer-level runs -------------------------------------------------------------------------

def build_trainer(config, progress=None):
  """A `flip.trainer.Trainer` exactly as `train_and_evaluate` builds it (nothing compiled yet)."""
  task = builders.build_task(config)
  partitioner = builders.build_partitioner(config.partitioning)
  return trainer_lib.Trainer(config, task, partitioner, progress or trainer_lib.Progress())


def place_state(trainer, host_state):
  """Puts a host copy of a train state on the trainer's mesh with the trainer's shardings.

  The state is rebuilt around the trainer's own optimizer definition (static pytree metadata that
  must be the very object the trainer's partitioned functions were built with).
  """
  host_state = trainer.state_shape.restore_state(host_state.state_dict())
  mesh = trainer.partitioner.mesh
  is_spec = lambda x: x is None or isinstance(x, PartitionSpec)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec or PartitionSpec()),
                           trainer.state_axes, is_leaf=is_spec)
  return jax.device_put(host_state, shardings)


@dataclasses.dataclass
class Run:
  """A few training steps: the host initial state, per-step losses and the final device state."""
  init_state: Any
  losses: List[float]
  state: Any


def run_steps(trainer, host_init_state, batches: Sequence[Mapping[str, np.ndarray]]) -> Run:
  """`trainer.train_step` (partitioned, as the loop calls it) over `batches`."""
  state = place_state(trainer, host_init_state)
  losses = []
  for batch in batches:
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return Run(host_init_state, losses, state)


@functools.lru_cache(maxsize=None)
def single_device_reference(num_steps: int = 3) -> Run:
  """The tiny config trained with plain `jax.jit` on one device (no mesh, no partitioner).

  The step and init functions are the trainer's own unpartitioned ones, so any difference from a
  partitioned run comes from partitioning alone. Shared by every test module in a session.
  """
  config = tiny_config()
  trainer = build_trainer(config)
  device = jax.devices()[0]
  with jax.default_device(device):
    state = jax.jit(trainer._init_state)(trainer._init_rng)  # pylint: disable=protected-access
    host_init = jax.device_get(state)
    step = jax.jit(trainer._train_step)  # pylint: disable=protected-access
    losses = []
    for batch in fixed_batches(config, num_steps):
      state, metrics = step(state, jax.device_put(batch, device))
      losses.append(float(metrics["loss"]))
  return Run(host_init, losses, state)


# --- the learning rate a step really applied ----------------------------------------------------

def formula_lr(config, epoch: float) -> float:
  """FLIP's schedule, float64: linear warmup from warmup_abs_lr, half cosine to min_abs_lr."""
  peak = config.learning_rate * config.batch_size / 256.0
  if epoch < config.warmup_epochs:
    return config.warmup_abs_lr + (peak - config.warmup_abs_lr) * epoch / config.warmup_epochs
  progress = min((epoch - config.warmup_epochs) / (config.num_epochs - config.warmup_epochs), 1.0)
  return config.min_abs_lr + (peak - config.min_abs_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def applied_adam_lr(params_before, params_after, mu, nu, count: int, b1: float, b2: float,
                    min_update: float = 0.1) -> float:
  """The lr of one AdamW step, recovered from non-decayed parameters (biases) in float64.

  For them p_new = p_old - lr * m_hat / (sqrt(v_hat) + eps), with the post-step moments and
  bias corrections at `count` (the optimizer's step count after the update). Elements with a
  small normalised update, and the key biases (rounding-noise gradients), are left out.
  """
  estimates = []
  for key in params_before:
    if not key.endswith("bias") or key.endswith("qkv_bias"):
      continue
    m_hat = mu[key].astype(np.float64) / (1 - b1 ** count)
    v_hat = nu[key].astype(np.float64) / (1 - b2 ** count)
    update = m_hat / (np.sqrt(v_hat) + optim.ADAMW_EPS)
    delta = params_after[key].astype(np.float64) - params_before[key].astype(np.float64)
    keep = np.abs(update) > min_update
    estimates.append(-delta[keep] / update[keep])
  return float(np.median(np.concatenate(estimates)))


def adam_moments(state):
  """({param path: mu}, {param path: nu}) of the AdamW state, host numpy."""
  mu, nu = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state.param_states))[0]:
    names = [_key_name(k) for k in path]
    for moment, out in (("mu", mu), ("nu", nu)):
      if moment in names:
        out["/".join(names[names.index(moment) + 1:])] = np.asarray(leaf)
  return mu, nu
