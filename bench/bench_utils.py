"""Shared pieces of the bench scripts: the benchmarked model sizes, the machine/version header,
alternating timing, and building the real partitioned train step (`flip.trainer.Trainer`).

Model presets (all through FLIP's config keys, so the code under test is the training code):
- `sbs`: the side-by-side model of docs/BENCHMARKS.md, the one compared with open_clip: ViT
  patch 16, width 384, 12 layers, 6 heads, class token (pooled), learned position embedding, at
  112 px; text width 256, 6 layers, 4 heads, context 32, vocab 30522, first-token pooling; embed
  256; LayerNorm epsilon 1e-5 (torch's default, open_clip's); fused q/k/v and exact GELU (open_clip's
  blocks); batch 64.
- `demo`: configs/cfg_demo.py unchanged (batch 256, 28 px, patch 4, img 128x4, txt 128x2).
- `tiny`: the `:smoke` size of configs/default.py (for the tests' smoke runs).

Compilation: the train step of the 18-layer side-by-side model takes ~20 s to compile on a
2-core machine (it took 3-5 min before the guard became one conditional), and several scripts
compile the very same step, so the scripts share JAX's
persistent compilation cache (`FLIP_BENCH_CACHE_DIR`, default ~/.cache/flip_bench/jax; "" turns
it off). A cached executable is the same program, so timings are unaffected.

Timing: every comparison runs its variants one after another in rounds (A, B, C, A, B, C, ...),
each step timed on its own after a compiling warm-up, and reports the median step time per
variant, so a burst of load from other processes on the shared machine hits all variants alike.
"""

import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
# Every bench script is a process of its own: the entry point's set-up comes first (the C
# allocator must be tuned before JAX starts its threads; flip/process_setup.py).
from flip import process_setup

process_setup.configure_process()

import jax
import numpy as np

from configs import cfg_demo
from configs import default

CACHE_DIR = os.environ.get("FLIP_BENCH_CACHE_DIR",
                           os.path.join(os.path.expanduser("~"), ".cache", "flip_bench", "jax"))
if CACHE_DIR:
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

# The side-by-side model (docs/BENCHMARKS.md); numbers are the benchmark's definition.
SBS_MODEL = dict(image_size=112, patch=16, img_width=384, img_depth=12, img_heads=6,
                 txt_width=256, txt_depth=6, txt_heads=4, text_len=32, vocab=30522, proj=256,
                 batch_size=64, layernorm_epsilon=1e-5)
MODEL_PRESETS = ("sbs", "demo", "tiny")


def side_by_side_config(mask_ratio: float = 0.0):
  """configs/default.py turned into the side-by-side model (see the module docstring)."""
  s = SBS_MODEL
  config = default.get_config()
  config.image_size = s["image_size"]
  default.set_img_tower(config, patch=s["patch"], width=s["img_width"], depth=s["img_depth"],
                        heads=s["img_heads"])
  default.set_txt_tower(config, width=s["txt_width"], depth=s["txt_depth"], heads=s["txt_heads"])
  img, txt = config.model.model_img, config.model.model_txt
  img.use_cls_token, img.pool, img.sincos = True, "cls", False
  img.layernorm_epsilon = txt.layernorm_epsilon = s["layernorm_epsilon"]
  for tower in (img, txt):  # open_clip's blocks: one fused in-projection, exact GELU
    tower.transformer.qkv_layout = "fused"
    tower.transformer.gelu = "exact"
  img.mask_ratio = mask_ratio
  txt.vocab_size = s["vocab"]
  config.aug.txt.max_len = s["text_len"]
  config.model.clr.proj_dim_out = s["proj"]
  config.batch_size = s["batch_size"]
  config.eval_dataset = ""
  return config


def config_from_file(path: str, arg: Optional[str] = None):
  """`get_config(arg)` of a config file (e.g. configs/cfg_mae_demo.py), as main.py loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"--config {path}: not a python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def preset_config(name: str, mask_ratio: Optional[float] = None):
  """The config of a model preset with the given image mask ratio (None: the preset's own)."""
  if name == "sbs":
    return side_by_side_config(0.0 if mask_ratio is None else mask_ratio)
  if name == "demo":
    config = cfg_demo.get_config()
  elif name == "tiny":
    config = default.get_config("smoke")
  else:
    raise ValueError(f"--model must be one of {MODEL_PRESETS}, got {name!r}")
  if mask_ratio is not None:
    config.model.model_img.mask_ratio = mask_ratio
  return config


def versions() -> str:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  parts = [f"python {platform.python_version()}", f"jax {jax.__version__}",
           f"jaxlib {jaxlib.__version__}", f"flax {flax.__version__}", f"numpy {np.__version__}"]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    parts.append(f"torch {torch.__version__}")
  except ImportError:
    pass
  return ", ".join(p for p in parts if p)


def machine() -> str:
  load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
  return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"{jax.devices()[0].platform} x{jax.device_count()}; load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")


def print_header(title: str) -> None:
  print(f"== {title}")
  print(f"machine: {machine()}")
  print(f"versions: {versions()}")
  print(f"date: {time.strftime('%Y-%m-%d %H:%M')}")


def time_alternating(step_fns: Dict[str, Callable[[], Any]], rounds: int,
                     steps_per_round: int, warmup: int = 1,
                     cpu_times: Optional[Dict[str, List[float]]] = None
                     ) -> Dict[str, List[float]]:
  """Wall seconds per call of each zero-argument function, run in alternating rounds.

  Each function must block until its work is done. `warmup` untimed rounds over all functions
  come first, in the same order (the first compiles; a second lets the C heap settle at the
  working size of every function, which calling one function twice in a row would not). When `cpu_times` is given, the process CPU seconds of each
  call are appended to `cpu_times[name]` too: on a machine shared with other jobs, CPU time
  counts only this process's work (threads spinning while they wait included), so its ratios are
  a second, load-independent reading next to the wall-clock ones.
  """
  for _ in range(warmup):
    for fn in step_fns.values():
      fn()
  times = {name: [] for name in step_fns}
  for _ in range(rounds):
    for name, fn in step_fns.items():
      for _ in range(steps_per_round):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times[name].append(time.perf_counter() - start)
        if cpu_times is not None:
          cpu_times.setdefault(name, []).append(time.process_time() - start_cpu)
  return times


def median(values: Sequence[float]) -> float:
  return statistics.median(values)


def spread(values: Sequence[float]) -> str:
  """'median (min-max)' of a list of seconds."""
  return f"{median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


class StepRunner:
  """The real partitioned train step (`flip.trainer.Trainer`) of a config on a fixed random batch.

  The train state is passed in and out (it is donated), so several runners of the same model (for
  instance different mask ratios) can share one state: `adopt` re-labels a state built by another
  runner with this runner's optimizer definition without copying it.
  """

  def __init__(self, config: Any, seed: int = 0):
    from flip import builders  # pylint: disable=g-import-not-at-top
    from flip import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.task = builders.build_task(config)
    self.partitioner = builders.build_partitioner(config.partitioning)
    self.trainer = trainer_lib.Trainer(config, self.task, self.partitioner, trainer_lib.Progress())
    local_batch = config.batch_size // self.trainer.data_layout.num_shards
    rng = np.random.RandomState(seed)
    # Token ids from 1 (no padding): every caption has the full context length, as on both sides
    # of the open_clip comparison.
    # Values below 255 (pixels), below the vocabulary's size where there is a text tower.
    limit = 255
    if "model_txt" in config.model:
      limit = min(limit, config.model.model_txt.vocab_size)
    self.batch = {k: rng.randint(1, limit, v.shape).astype(v.dtype)
                  for k, v in self.task.batch_spec(local_batch).items()}
    self.state = None

  def init_state(self):
    return self.trainer.init_state()

  def adopt(self, state):
    treedef = jax.tree.structure(self.trainer.state_shape)
    return jax.tree.unflatten(treedef, jax.tree.leaves(state))

  def step(self, state):
    state, metrics = self.trainer.train_step(self.adopt(state), self.batch)
    jax.block_until_ready(metrics)
    return state
