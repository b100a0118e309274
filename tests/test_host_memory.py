"""flip.host_memory: XLA's per-execution temporaries stop being faulted in again at every call.

Each case runs in a fresh interpreter (the allocator is tuned when `flip` is imported, so it
cannot be undone inside this one) and counts the minor page faults of repeated calls of a jitted
function with two 128 MiB temporaries, against the page count of those temporaries.
"""

import os
import platform
import subprocess
import sys

import pytest

TEMP_BYTES = 2 * 8192 * 4096 * 4  # the matmul output y and its reversed copy, float32
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

_PROGRAM = """
import resource
import flip
import jax
import jax.numpy as jnp

a = jnp.ones((8192, 16), jnp.float32)
b = jnp.ones((16, 4096), jnp.float32)


@jax.jit
def f(a, b):
  y = a @ b
  return jnp.sum(jnp.tanh(y) * y[::-1]), jnp.max(y)


for _ in range(6):  # compile, then let the heap reach its steady state
  jax.block_until_ready(f(a, b))
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  jax.block_until_ready(f(a, b))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 3
print(flip.host_memory.APPLIED, faults)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the tuning applies to glibc's malloc only")


def _faults_per_call(keep_freed_memory: bool):
  env = dict(os.environ)
  if not keep_freed_memory:
    env["FLIP_KEEP_FREED_MEMORY"] = "0"
  else:
    env.pop("FLIP_KEEP_FREED_MEMORY", None)
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  applied, faults = out.stdout.split()[-2:]
  return applied == "True", float(faults)


@glibc_only
def test_temporaries_are_not_faulted_in_again():
  applied, faults = _faults_per_call(keep_freed_memory=True)
  assert applied
  temp_pages = TEMP_BYTES / PAGE_BYTES
  # A few pages of bookkeeping at most, against 65,536 pages of temporaries.
  assert faults < 0.01 * temp_pages, (faults, temp_pages)


@glibc_only
def test_opt_out_keeps_glibc_defaults():
  # The reference: with glibc's defaults every call maps its temporaries afresh, so each call
  # faults in at least their pages. (If this ever fails, glibc stopped doing that and the
  # tuning is no longer needed.)
  applied, faults = _faults_per_call(keep_freed_memory=False)
  assert not applied
  assert faults >= 0.9 * TEMP_BYTES / PAGE_BYTES, faults
