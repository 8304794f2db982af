"""Train: run the experiment a config describes (source pre-training and/or adaptation).

  python -m jaxreid.main --config=configs/mmt.py[:task] [--config.train.epochs=10] [--workdir=DIR]
  (or jaxreid-train ...)

Prints the results table. Rerunning the same command with the same work dir resumes an
interrupted run. Any config field is set with `--config.<field>=value`. A relative `--config`
path that does not exist from the current folder is looked for in the repository (the folder
holding configs/), so `--config=configs/mmt.py` works from anywhere. Errors (a config key or task
that does not exist, missing data, a work dir of another run, ...) are one line; exit status 2.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import configs
from jaxreid import distributed
from jaxreid import host_memory
from jaxreid import reporting
from jaxreid import run as run_lib
from jaxreid.tools import common

config_flags.DEFINE_config_file(
    'config',
    None,
    'Path to a config file (configs/*.py[:task]); set any of its fields with '
    '--config.<field>=value.',
    lock_config=True,
)
flags.DEFINE_string(
    'workdir',
    None,
    'Where checkpoints, metrics and plots go ' '(default: workdirs/<method>_<source>_to_<target>).',
)
flags.DEFINE_string(
    'compilation_cache',
    os.environ.get('JAXREID_COMPILATION_CACHE') or os.path.expanduser('~/.cache/jaxreid/xla'),
    'Persistent XLA compilation cache directory ("" disables it; default: '
    '$JAXREID_COMPILATION_CACHE, else ~/.cache/jaxreid/xla).',
)
flags.DEFINE_bool(
    'deterministic',
    False,
    'Bitwise-repeatable runs on GPUs: deterministic XLA ops and no convolution '
    'autotuning (see deterministic_xla_flags). Slower; CPU runs are repeatable '
    'without it.',
)
flags.DEFINE_bool(
    'allow_safe_changes',
    False,
    'Resume a work dir whose config differs only in keys that extend or re-report '
    'the run (jaxreid.workdir.SAFE_CHANGES, e.g. more epochs).',
)
flags.DEFINE_string(
    'coordinator_address',
    '',
    'Several processes / hosts as one run (jax.distributed): host:port of process 0, the same '
    'for every process; with --num_processes and --process_id. Empty: one process.',
)
flags.DEFINE_integer('num_processes', 1, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', 0, 'This process: 0 .. num_processes - 1 (0 writes the files).')
common.define_keep_host_memory(flags.FLAGS)
common.define_verbose(flags.FLAGS)
FLAGS = flags.FLAGS

# Both are needed for repeatable weights on GPUs: besides non-deterministic ops, autotuning picks
# convolution algorithms by timing them, which varies from run to run.
DETERMINISTIC_XLA_FLAGS = ('--xla_gpu_deterministic_ops=true', '--xla_gpu_autotune_level=0')


def deterministic_xla_flags(xla_flags: str) -> str:
  """`xla_flags` (the XLA_FLAGS value) with DETERMINISTIC_XLA_FLAGS added; a flag the user set
  already (any value) is kept as given."""
  parts = xla_flags.split()
  names = {p.split('=', 1)[0] for p in parts}
  parts += [f for f in DETERMINISTIC_XLA_FLAGS if f.split('=', 1)[0] not in names]
  return ' '.join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])} (see --help)')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress is ours
  if FLAGS.deterministic:  # read when the backend starts, i.e. before any device use below
    os.environ['XLA_FLAGS'] = deterministic_xla_flags(os.environ.get('XLA_FLAGS', ''))
  host_memory.apply(FLAGS.keep_host_memory)  # before JAX's CPU client starts its threads
  if FLAGS.num_processes > 1:
    if not FLAGS.coordinator_address:
      raise app.UsageError('--num_processes > 1 needs --coordinator_address=HOST:PORT')
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      'workdirs',
      f'{config.method}_{reporting.domain_name(config, "source")}_to_'
      f'{reporting.domain_name(config, "target")}',
  )
  # Bad input (config, data, work dir, weights, ...) is one line: common.run_app.
  run_lib.train_and_evaluate(config, workdir, allow_safe_changes=FLAGS.allow_safe_changes)


# ----------------------------------------------------------------------------------------------
# The command line: the config is checked before absl parses it, so that its errors are one line

_CONFIG_ARG = re.compile(r'--?config(=|$)')
_OVERRIDE_ARG = re.compile(r'--?(no)?config\.([^=]+)')


def repository_root() -> str:
  """The folder holding configs/ (the `configs` package, installed with jaxreid)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(configs.__file__)))


def resolve_config_path(path: str) -> str:
  """`path` as given if it exists, else (relative) from the repository root; raises
  common.UsageError naming both places looked and the experiments there."""
  if os.path.exists(path) or os.path.isabs(path):
    if not os.path.isfile(path):
      raise common.UsageError(f'config file {path} not found')
    return path
  in_repo = os.path.join(repository_root(), path)
  if os.path.isfile(in_repo):
    return in_repo
  configs_dir = os.path.join(repository_root(), 'configs')
  known = sorted(f for f in os.listdir(configs_dir) if f.endswith('.py') and f[0] != '_')
  known.remove('base.py')
  raise common.UsageError(
      f'config file {path} not found: looked for {os.path.abspath(path)} and {in_repo}; the '
      f'experiments in configs/: {", ".join(known)}'
  )


def load_config(arg: str, shown: str | None = None):
  """`get_config(...)` of `--config`'s value (`path[:argument]`), as ml_collections'
  config_flags calls it (it is called once more when absl parses the flag: a config is a pure
  function of its argument). A failure is a common.UsageError naming the config (as `shown`)."""
  path, colon, config_arg = arg.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('jaxreid_config_checked', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([config_arg] if colon else []))
  except Exception as e:  # noqa: BLE001 - whatever a config file raises is the user's to fix
    what = str(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'
    raise common.UsageError(f'--config={shown or arg}: {what}') from e


def config_keys(config, prefix: str = 'config.') -> list[str]:
  """Every field of `config`, nested ones included, as `config.a.b`."""
  keys = []
  for key, value in config.items():
    keys.append(prefix + key)
    if hasattr(value, 'items'):
      keys += config_keys(value, f'{prefix}{key}.')
  return keys


def check_config_args(argv: list[str]) -> list[str]:
  """`argv` with `--config`'s path resolved (`resolve_config_path`), after loading the config
  and checking that every `--config.<field>` override names a field (with a did-you-mean)."""
  argv = list(argv)
  head = argv[: argv.index('--')] if '--' in argv else argv
  at = None
  for i, arg in enumerate(head):
    if _CONFIG_ARG.match(arg):
      if '=' not in arg and i + 1 < len(head):
        argv[i : i + 2] = [f'{arg}={argv[i + 1]}']
      at = i
  if at is None or '=' not in argv[at]:
    return argv  # absl reports a missing --config or value
  flag, given = argv[at].split('=', 1)
  path, colon, config_arg = given.partition(':')
  value = resolve_config_path(path) + colon + config_arg
  argv[at] = f'{flag}={value}'
  config = load_config(value, shown=given)
  keys = None
  for arg in argv[: argv.index('--')] if '--' in argv else argv:
    m = _OVERRIDE_ARG.fullmatch(arg.split('=', 1)[0])
    if not m:
      continue
    keys = config_keys(config) if keys is None else keys
    key = f'config.{m.group(2)}'
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      hint = f'; did you mean {close[0]}?' if close else ''
      raise common.UsageError(f'unknown config key {key} (in {arg}){hint}')
  return argv


def run() -> NoReturn:
  """`python -m jaxreid.main` and `jaxreid-train`: parses the process's arguments, trains. Exits."""
  common.run_app(
      main,
      doc=__doc__,
      modules=(__name__, common.__name__),
      required=('config',),
      prepare=check_config_args,
  )


if __name__ == '__main__':
  run()
