"""Process-wide set-up, done by a process's entry point and never by importing `flip`.

`configure_process()` is the first thing main.py, `python -m flip.visualize`,
`python -m flip.data.demo`, the bench scripts and tests/conftest.py do. It is idempotent (the first
call decides, later calls return the same `ProcessSetup`) and does three things:

1. Quieter C++ logs: `TF_CPP_MIN_LOG_LEVEL=1` unless the environment sets it, which drops the INFO
   lines of TensorFlow's and XLA's C++ runtimes and keeps their warnings and errors. The runtimes
   read it when they first log, so it applies when `configure_process()` runs before TensorFlow
   or jaxlib is imported. A few INFO lines are logged while TensorFlow's libraries load, before
   their logging reads the variable (oneDNN's notice, "Could not find cuda drivers", each after
   "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR");
   TensorFlow is imported here with stderr captured, and at a level of 1 or more those lines are
   dropped and the rest written back.
2. The C allocator: `flip.host_memory.keep_freed_memory()` when JAX's backend will be the CPU,
   decided without initialising a backend by this rule: if `JAX_PLATFORMS` is set, the backend is
   the CPU when every platform it lists is `cpu`; otherwise it is the CPU when no accelerator
   plugin is installed (no `jax_plugins.*` module, no `jax_plugins` entry point, no `libtpu`).
   An accelerator host whose accelerator is absent (JAX then falls back to the CPU) is left at
   glibc's defaults; `JAX_PLATFORMS=cpu` makes it tune. `FLIP_KEEP_FREED_MEMORY=0` opts out.
   Threads that exist before the call keep the arenas they have, so call it before JAX's backend
   or TensorFlow starts its threads.
3. TensorFlow (when installed) kept off the GPUs, which belong to JAX. TensorFlow's CUDA build
   initialises CUDA at its first device query (`tf.config.list_physical_devices`,
   `set_visible_devices`, or the first op of a `tf.data` pipeline) and, on a host without an
   NVIDIA driver, logs `E… cuda_platform.cc:52] failed call to cuInit` at ERROR; neither
   `import tensorflow` nor JAX prints it. So:
   - when the CUDA driver library (`libcuda.so.1`) loads, `tf.config.set_visible_devices([],
     "GPU")`, as before (cuInit succeeds there, nothing is printed);
   - when it does not, TensorFlow cannot use a GPU and there is nothing to hide; the first device
     query is made here with stderr captured, and everything it wrote except that one cuInit line
     is written back. Later queries do not initialise CUDA again, so the line never appears.
   TensorFlow is therefore imported here whenever it is installed; a process that never uses it
   pays its import time.
"""

import contextlib
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
import tempfile
from typing import Iterator, List, Optional

from flip import host_memory

TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_TF_LOG_LEVEL = "1"  # INFO off; warnings and errors on
CUDA_DRIVER_LIBRARY = "libcuda.so.1"
CUINIT_FAILURE = re.compile(rb"failed call to cuInit")
# INFO lines (and absl's notice before them) that TF's libraries log before reading the level.
_PRE_INIT_INFO = re.compile(
    rb"^(I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called)")
_NOTHING = re.compile(rb"(?!)")

TF_ABSENT = "absent"
TF_GPUS_HIDDEN = "gpus hidden"
TF_NO_CUDA_DRIVER = "no cuda driver"


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
  """What `configure_process` did."""
  jax_backend_is_cpu: bool
  malloc_tuned: bool  # flip.host_memory.keep_freed_memory() applied
  tensorflow: str  # TF_ABSENT, TF_GPUS_HIDDEN or TF_NO_CUDA_DRIVER
  tf_cpp_min_log_level: str


_SETUP: Optional[ProcessSetup] = None


def configure_process() -> ProcessSetup:
  """The process-wide set-up of the module docstring; idempotent."""
  global _SETUP
  if _SETUP is None:
    os.environ.setdefault(TF_LOG_LEVEL_ENV, DEFAULT_TF_LOG_LEVEL)
    on_cpu = jax_backend_is_cpu()
    tuned = host_memory.keep_freed_memory() if on_cpu else False
    _SETUP = ProcessSetup(jax_backend_is_cpu=on_cpu, malloc_tuned=tuned,
                          tensorflow=keep_tensorflow_off_gpus(),
                          tf_cpp_min_log_level=os.environ[TF_LOG_LEVEL_ENV])
  return _SETUP


def installed_accelerator_plugins() -> List[str]:
  """Names of the installed PJRT plugins JAX would try (and `libtpu`), without importing jax."""
  names = set()
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    names.update(m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations)))
  names.update(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
  if importlib.util.find_spec("libtpu") is not None:
    names.add("libtpu")
  return sorted(names)


def jax_backend_is_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, by the rule of the module docstring."""
  platforms = [p.strip().lower() for p in os.environ.get("JAX_PLATFORMS", "").split(",")]
  platforms = [p for p in platforms if p]
  if platforms:
    return all(p == "cpu" for p in platforms)
  return not installed_accelerator_plugins()


def _info_logs_off() -> bool:
  try:
    return int(os.environ.get(TF_LOG_LEVEL_ENV, "0")) >= 1
  except ValueError:
    return False


def cuda_driver_loadable() -> bool:
  """Whether the NVIDIA driver's CUDA library can be loaded (what cuInit needs)."""
  try:
    ctypes.CDLL(CUDA_DRIVER_LIBRARY)
  except OSError:
    return False
  return True


def keep_tensorflow_off_gpus() -> str:
  """Step 3 of the module docstring; returns TF_ABSENT, TF_GPUS_HIDDEN or TF_NO_CUDA_DRIVER."""
  if importlib.util.find_spec("tensorflow") is None:
    return TF_ABSENT
  with stderr_without(_PRE_INIT_INFO if _info_logs_off() else _NOTHING):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if cuda_driver_loadable():
    tf.config.set_visible_devices([], "GPU")
    return TF_GPUS_HIDDEN
  with stderr_without(CUINIT_FAILURE):
    tf.config.list_physical_devices("GPU")
  return TF_NO_CUDA_DRIVER


@contextlib.contextmanager
def stderr_without(pattern: "re.Pattern[bytes]") -> Iterator[None]:
  """Captures file descriptor 2 for the block, then writes back every line not matching pattern."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [line for line in capture.read().splitlines(keepends=True)
              if not pattern.search(line)]
      if kept:
        os.write(2, b"".join(kept))
