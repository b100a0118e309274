"""How the host C allocator treats the large buffers XLA's CPU backend allocates every step.

XLA's CPU runtime allocates each execution's temporaries (activations, gradients: gigabytes for
a train step) as one block with `malloc` from one of its worker threads and frees it when the step
ends. With glibc's defaults such a block is served by a fresh `mmap` (it is above the mmap
threshold, and a worker thread's arena cannot hold it) and unmapped at `free`, so every step faults
the whole block in again page by page (docs/BENCHMARKS.md, "Host allocator and the non-finite
guard", has the measured faults, kernel time and step times).

`keep_freed_memory` makes glibc keep such blocks: every thread allocates from the main arena, which
grows with `brk` and has no size limit per block, nothing is served by `mmap`, and freed memory at
the top of the heap is never returned to the kernel. A step then faults in pages only when the heap
grows. XLA frees a step's temporaries on its own thread after the outputs are ready, so the next
step's allocation can come before that free, and the heap grows by another block instead of
reusing the freed one; this happens several times, at steps that depend on thread timing, before
the heap stops growing. A step that does not grow it reuses already mapped pages. The price is that
the process's resident size stays at that high-water mark.

Importing this module changes nothing. A process entry point applies it through
`flip.process_setup.configure_process()` (on JAX's CPU backend), before JAX's or TensorFlow's
threads create their own arenas (arenas created earlier keep serving their threads); it acts only
on glibc, and not at all when the environment sets `FLIP_KEEP_FREED_MEMORY=0`. Other C libraries
(macOS, musl) are left alone.
"""

import ctypes
import ctypes.util
import os
import platform

OPT_OUT_ENV = "FLIP_KEEP_FREED_MEMORY"

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int; glibc stores the trim threshold as size_t, so -1 means "never trim".
_NEVER_TRIM = -1


def keep_freed_memory() -> bool:
  """Tunes glibc's malloc as the module docstring says; True if it was applied."""
  if os.environ.get(OPT_OUT_ENV, "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  # mallopt returns 1 on success and 0 on failure.
  return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
             for param, value in settings)

