"""Test-session settings: a persistent XLA compilation cache shared by every test, so the
end-to-end runs that compile the same programs several times (resume tests) compile once."""

import os
import tempfile

import jax

# One directory per pytest-xdist worker: JAX writes cache entries in place, so two workers
# compiling the same program would read each other's half-written files.
_CACHE = os.path.join(
    os.environ.get('JAXREID_TEST_COMPILATION_CACHE')
    or os.path.join(tempfile.gettempdir(), 'jaxreid-test-xla-cache'),
    os.environ.get('PYTEST_XDIST_WORKER', 'main'),
)
jax.config.update('jax_compilation_cache_dir', _CACHE)
# ... which the `jaxreid.main` processes that tests start use too (run one at a time per worker),
# instead of the user's ~/.cache/jaxreid/xla (the suite neither fills nor relies on it).
os.environ['JAXREID_COMPILATION_CACHE'] = _CACHE
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
