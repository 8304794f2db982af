"""Keep freed host memory in the process on the CPU backend, so a train step stops paying the
kernel for fresh pages.

XLA:CPU allocates a program's temporaries on every execution with the C allocator and frees them
afterwards. glibc serves large allocations (and everything from its per-thread arenas, whose heaps
it shrinks) with fresh `mmap`ed pages and hands them back on `free`, so every step faults in and
zeroes its buffers anew. Serving every allocation from the one main heap (`M_ARENA_MAX` 1,
`M_MMAP_MAX` 0) and never trimming it (`M_TRIM_THRESHOLD`) lets the next step reuse the same
pages; each setting alone, and the pairs of them, leave the faults.

The cost: the one heap fragments and is never given back, so peak memory grows and compilation
is slower; one-network steps and feature passes gain, two-network steps (MMT) do not
(docs/performance.md). So it is off by default and an option (`--keep_host_memory`, defined by
the command lines in `jaxreid.tools.common`). The settings are glibc's `mallopt`; other C
libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

# glibc malloc.h parameter numbers
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False
MODES = ('auto', 'on', 'off')
# JAX's accelerator plugins (PJRT plugins live in the jax_plugins namespace); where one is
# installed, the train step's buffers live on the device.
_ACCELERATOR_MODULES = ('jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu')


def cpu_only() -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is
  installed. Decided without starting JAX (the allocator must be set before its threads exist)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def apply(mode: str = 'auto') -> bool:
  """`mode` 'auto' keeps freed memory on CPU-only runs (`cpu_only`), 'on' always, 'off' never.
  Returns whether the allocator settings are in force."""
  if mode not in MODES:
    raise ValueError(f'host memory mode must be one of {MODES}, got {mode!r}')
  if mode == 'off' or (mode == 'auto' and not cpu_only()):
    return _applied
  return keep_freed_memory()


def keep_freed_memory() -> bool:
  """Set glibc's allocator to reuse freed memory (module docstring). Call it before JAX creates
  its CPU client (threads that allocated earlier keep their own arena). Returns whether the
  settings were applied (False where the C library is not glibc). Idempotent."""
  global _applied
  if _applied:
    return True
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # glibc only  # noqa: B018
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  ok = all(
      mallopt(param, value)
      for param, value in (
          (_M_ARENA_MAX, 1),
          (_M_MMAP_MAX, 0),
          (_M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt takes an int: 2 GiB of free heap top kept
          (_M_TOP_PAD, 64 << 20),
      )
  )
  _applied = ok
  return ok
