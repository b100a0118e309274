"""flip.process_setup: importing flip changes nothing in the process; `configure_process()` does
the set-up, and a run on a host without a CUDA driver prints no cuInit error.

Each process-level case runs in a fresh interpreter. The references are glibc's own accounting
(`mallinfo2().hblks`, the number of blocks served by mmap: with glibc's defaults a 64 MiB
`malloc` is one, after the tuning it is served from the heap), a recorder put in place of
`tf.config.set_visible_devices` before anything else is imported, and, on a host without the CUDA
driver library, TensorFlow's own cuInit error line, which its first device query prints there at
TF_CPP_MIN_LOG_LEVEL=0.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
import tensorflow as tf

from flip import process_setup

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_CUDA_DRIVER = not process_setup.cuda_driver_loadable()
# Modules whose import must leave the process alone: the package, the loop and the evaluators.
CLEAN_MODULES = ("flip", "flip.compat", "flip.process_setup", "flip.host_memory",
                 "flip.metrics_writer", "flip.partitioning", "flip.checkpoints", "flip.losses",
                 "flip.config", "flip.optim", "flip.masking", "flip.models.vit",
                 "flip.models.text", "flip.tasks.contrastive", "flip.tasks.mae",
                 "flip.tasks.classifier", "flip.builders", "flip.train", "flip.evals.registry",
                 "flip.evals.zeroshot", "flip.evals.classification", "flip.evals.reconstruction",
                 "flip.evals.eval_only", "flip.data.laion", "flip.data.eval_sources",
                 "flip.visualize")

_MALLOC_PROBE = """
import ctypes, importlib, json, sys


class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]


def large_malloc_is_mmapped():
  before = libc.mallinfo2().hblks
  block = libc.malloc(64 << 20)
  after = libc.mallinfo2().hblks
  libc.free(block)
  return after > before
"""

_TF_RECORDER = """
import tensorflow as tf

calls = []
original = tf.config.set_visible_devices


def record(*args, **kwargs):
  calls.append(repr(args))
  return original(*args, **kwargs)


tf.config.set_visible_devices = record
tf.config.experimental.set_visible_devices = record
"""

_IMPORTS = _MALLOC_PROBE + _TF_RECORDER + """
for name in sys.argv[1:]:
  importlib.import_module(name)
print(json.dumps({"set_visible_devices": calls, "mmapped": large_malloc_is_mmapped()}))
"""

_SET_UP = """
from flip import process_setup
setup = process_setup.configure_process()
assert process_setup.configure_process() is setup
"""

_AFTER_SET_UP = """
list(tf.data.Dataset.range(3).as_numpy_iterator())  # TensorFlow in use after the set-up
print(json.dumps({"set_visible_devices": calls, "mmapped": large_malloc_is_mmapped(),
                  "malloc_tuned": setup.malloc_tuned, "tensorflow": setup.tensorflow,
                  "level": setup.tf_cpp_min_log_level,
                  "gpus": len(tf.config.get_visible_devices("GPU"))}))
"""
# The recorder is in place before the set-up (TensorFlow imported first, at the caller's level).
_CONFIGURE = _MALLOC_PROBE + _TF_RECORDER + _SET_UP + _AFTER_SET_UP
# The set-up first, as an entry point does (TensorFlow imported by it).
_CONFIGURE_FIRST = _MALLOC_PROBE + _SET_UP + "import tensorflow as tf\ncalls = []\n" + _AFTER_SET_UP


def _run(program, *args, **env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "FLIP_KEEP_FREED_MEMORY")}
  env.update(JAX_PLATFORMS="cpu", **env_overrides)
  proc = subprocess.run([sys.executable, "-c", program, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_importing_flip_changes_nothing_in_the_process():
  out, stderr = _run(_IMPORTS, *CLEAN_MODULES, TF_CPP_MIN_LOG_LEVEL="0")
  assert out["set_visible_devices"] == []
  assert out["mmapped"]  # glibc's defaults
  if NO_CUDA_DRIVER:  # TensorFlow's devices were never initialised
    assert "cuInit" not in stderr


def test_configure_process_tunes_malloc_and_keeps_tf_off_gpus_without_a_cuinit_line():
  out, stderr = _run(_CONFIGURE, TF_CPP_MIN_LOG_LEVEL="0")
  assert out["malloc_tuned"] and not out["mmapped"]
  assert out["gpus"] == 0
  assert out["level"] == "0"  # the user's level is kept
  if NO_CUDA_DRIVER:
    assert out["tensorflow"] == process_setup.TF_NO_CUDA_DRIVER
    assert "cuInit" not in stderr
    assert "oneDNN" in stderr  # TensorFlow's other lines at level 0 still reach stderr
  else:
    assert out["tensorflow"] == process_setup.TF_GPUS_HIDDEN
    assert out["set_visible_devices"] == [repr(([], "GPU"))]


def test_configure_process_defaults_to_quieter_logs_and_honours_the_malloc_opt_out():
  out, stderr = _run(_CONFIGURE_FIRST, FLIP_KEEP_FREED_MEMORY="0")
  assert not out["malloc_tuned"] and out["mmapped"]
  assert out["level"] == process_setup.DEFAULT_TF_LOG_LEVEL
  assert not [line for line in stderr.splitlines() if line.startswith("I0000")], stderr
  assert "cuInit" not in stderr


def test_main_py_prints_no_cuinit_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0")
  proc = subprocess.run(
      [sys.executable, str(REPO_ROOT / "main.py"), f"--workdir={tmp_path / 'wd'}",
       "--config=configs/cfg_flip_base.py:smoke", f"--config.laion_path={tmp_path / 'none'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "config.laion_path" in proc.stderr.splitlines()[-1]
  assert "cuInit" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("platforms,plugins,expected", [
    ("cpu", ["cuda12"], True),
    ("CPU", [], True),
    ("cuda", [], False),
    ("cpu,cuda", [], False),
    ("", [], True),
    ("", ["cuda12"], False),
    ("", ["libtpu"], False),
])
def test_jax_backend_rule(monkeypatch, platforms, plugins, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setattr(process_setup, "installed_accelerator_plugins", lambda: plugins)
  assert process_setup.jax_backend_is_cpu() is expected


def test_jax_backend_rule_agrees_with_jax_here(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert process_setup.jax_backend_is_cpu() is (jax.default_backend() == "cpu")


def test_gpus_are_hidden_from_tensorflow_where_the_cuda_driver_loads(monkeypatch):
  calls = []
  monkeypatch.setattr(process_setup, "cuda_driver_loadable", lambda: True)
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda *args: calls.append(args))
  assert process_setup.keep_tensorflow_off_gpus() == process_setup.TF_GPUS_HIDDEN
  assert calls == [([], "GPU")]


def test_stderr_without_drops_only_the_matching_lines(capfd):
  with process_setup.stderr_without(process_setup.CUINIT_FAILURE):
    os.write(2, b"kept 1\nE0000 cuda_platform.cc:52] failed call to cuInit: 303\nkept 2\n")
  assert capfd.readouterr().err == "kept 1\nkept 2\n"
