"""Test-session settings: a persistent XLA compilation cache shared by every test, so the
end-to-end runs that compile the same programs several times (resume tests) compile once."""

import os
import tempfile

import jax

_CACHE = os.environ.get('JAXREID_TEST_COMPILATION_CACHE') or os.path.join(
    tempfile.gettempdir(), 'jaxreid-test-xla-cache'
)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
