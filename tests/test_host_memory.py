"""jaxreid.host_memory: with it, repeated XLA:CPU executions reuse their freed buffers instead of
faulting in fresh pages each time (the measured cost is in
experiments/benchmarks/results_benchmark.md)."""

import platform
import subprocess
import sys
import textwrap

import pytest

from jaxreid import host_memory

# A train step in miniature: gradient of a 3x3 convolution's output energy, 64 MiB of activations
# per call. glibc serves such buffers with fresh mmap'ed pages and returns them afterwards,
# unless told to keep freed memory; the kept heap reaches its steady size after a few calls.
_PROGRAM = textwrap.dedent("""
    import resource, sys
    from jaxreid import host_memory
    if sys.argv[1] == 'on':
      assert host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    def energy(w, x):
      y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.sum(jax.nn.relu(y) ** 2)
    step = jax.jit(jax.grad(energy))
    x = jnp.ones((16, 128, 64, 32), jnp.float32)
    w = jnp.full((3, 3, 32, 128), 0.01, jnp.float32)
    for _ in range(8):  # compile, then let the heap reach its steady size
      step(w, x).block_until_ready()
    for _ in range(4):  # four windows of two calls: page faults per call in each
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(2):
        step(w, x).block_until_ready()
      print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2)
""")


def _faults_per_call(mode):
  """The fewest page faults per call over the program's windows (a window can catch the heap
  still growing when the machine is busy)."""
  out = subprocess.run(
      [sys.executable, '-c', _PROGRAM, mode], capture_output=True, text=True, check=True
  ).stdout
  return min(float(v) for v in out.split()[-4:])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc allocator settings')
def test_kept_memory_stops_fresh_pages_for_every_execution():
  pages = 64 * 2**20 // 4096  # the activations' pages: 16,384
  assert _faults_per_call('off') > pages  # every call faults its buffers in afresh
  assert _faults_per_call('on') < pages / 20  # ... and reuses the freed ones when kept


def test_mode_decides_without_starting_jax(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not host_memory.cpu_only()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.cpu_only()
  monkeypatch.setattr(host_memory, '_applied', False)
  assert host_memory.apply('off') is False  # never touches the allocator
  with pytest.raises(ValueError, match='auto'):
    host_memory.apply('sometimes')
