"""`python -m jaxreid.main --config=configs/mmt.py [--config.train.epochs=10] [--workdir=DIR]`.

Runs the experiment a config describes (source pre-training and/or adaptation) and prints the
results table. Rerunning the same command with the same work dir resumes an interrupted run.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaxreid import host_memory  # defines --keep_host_memory

config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py[:task]).', lock_config=True
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
flags.DEFINE_bool('verbose', False, 'Show the Python traceback of an error.')
flags.DEFINE_string(
    'coordinator_address',
    '',
    'Several processes / hosts as one run (jax.distributed): host:port of process 0, the same '
    'for every process; with --num_processes and --process_id. Empty: one process.',
)
flags.DEFINE_integer('num_processes', 1, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', 0, 'This process: 0 .. num_processes - 1 (0 writes the files).')
FLAGS = flags.FLAGS

# Measured on one H100 (jax 0.11, synthetic pre-training, same seed, experiments/
# results_training.md): two runs differ in their weights (and their target mAP by several points)
# unless both flags are set; with both the exported models are byte-identical. The deterministic-ops
# flag alone is not enough: autotuning picks convolution algorithms by timing, which varies.
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
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress is ours
  if FLAGS.deterministic:  # read when the backend starts, i.e. before any device use below
    os.environ['XLA_FLAGS'] = deterministic_xla_flags(os.environ.get('XLA_FLAGS', ''))
  host_memory.apply(FLAGS.keep_host_memory)  # before JAX's CPU client starts its threads
  import jax

  if FLAGS.num_processes > 1:
    from jaxreid import distributed

    if not FLAGS.coordinator_address:
      raise app.UsageError('--num_processes > 1 needs --coordinator_address=HOST:PORT')
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  from jaxreid import evaluation  # imported after flags so --help stays fast
  from jaxreid import run

  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      'workdirs',
      f'{config.method}_{evaluation.domain_name(config, "source")}_to_'
      f'{evaluation.domain_name(config, "target")}',
  )
  from jaxreid.checkpoint import CheckpointError
  from jaxreid.config_checks import ConfigError
  from jaxreid.convert import ConversionError
  from jaxreid.data import DataError
  from jaxreid.train import NonFiniteLossError
  from jaxreid.workdir import WorkdirError

  try:
    run.train_and_evaluate(config, workdir, allow_safe_changes=FLAGS.allow_safe_changes)
  except (
      ConfigError,
      DataError,
      FileNotFoundError,
      NonFiniteLossError,
      ConversionError,
      WorkdirError,
      CheckpointError,
  ) as e:
    if FLAGS.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
