"""What the command-line tools share: one way to parse flags, print help and report errors, the
flags shared by several tools (`--verbose`, `--keep_host_memory`) and the names of the model flags
(`inference_flags` defines them).

Most tools define their flags on a `flags.FlagValues` of their own (`flag_values()`) rather than
absl's global FLAGS, so that tools can share a process (tests call several tools' `main(argv)` one
after another, each parse starting from the defaults) and a flag name can mean different things
in two tools (`jaxreid-convert --depth` defaults to 50; `jaxreid-evaluate --depth` only overrides
when given); `run` parses them and calls the tool. The trainer and the benchmark keep absl's
global FLAGS (ml_collections' `--config.<field>=value` overrides live there) and `app.run`;
`run_app` gives them the same behaviour:

* `--help` (`-h`, `--helpfull`): the tool's docstring and its flags on stdout, exit status 0;
* a bad command line (unknown or missing flag, bad value) or bad input (a missing or unreadable
  file, weights of another network, a config error, ...): one line `error: ...` on stderr, exit
  status 2, no traceback; `--verbose` lets the exception through instead (its traceback);
* values as `--flag=value` or `--flag value`; boolean flags as absl's `--flag` / `--noflag` /
  `--flag=false`, and argparse's `--no-flag`.

Flag names: underscores; `--model` is what a tool reads, `--out` the file it writes as its result
(parent folders are created: `output_path`).
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any
from typing import Callable
from typing import NoReturn
from typing import Sequence
import zipfile

from absl import app
from absl import flags

from jaxreid import host_memory

HELP_ARGS = ('-h', '-?', '--help', '--helpshort', '--helpfull')
EXIT_USAGE = 2  # a bad command line or bad input (argparse's status)

# The library's exceptions for bad input, as (module, class): looked up among the modules
# imported so far when an exception arrives (one that was raised had its module imported), so
# that a tool's `--help` imports nothing for them.
LIBRARY_ERRORS = (
    ('jaxreid.config_checks', 'ConfigError'),
    ('jaxreid.data', 'DataError'),
    ('jaxreid.train', 'NonFiniteLossError'),
    ('jaxreid.convert', 'ConversionError'),
    ('jaxreid.workdir', 'WorkdirError'),
    ('jaxreid.checkpoint', 'CheckpointError'),
    ('jaxreid.inference', 'InferenceError'),
    ('jaxreid.export', 'ExportError'),
)


class UsageError(app.UsageError):
  """A bad command line or bad input found by a tool itself; the message says what to change."""


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions reported as one line: the library's (LIBRARY_ERRORS), files that cannot be
  read or written (OSError), files that are not checkpoints (pickle / zip errors), usage errors."""
  found = [getattr(sys.modules[m], name, None) for m, name in LIBRARY_ERRORS if m in sys.modules]
  return (
      *[c for c in found if isinstance(c, type)],
      OSError,
      pickle.UnpicklingError,
      zipfile.BadZipFile,
      app.UsageError,
  )


def one_line(message: Any) -> str:
  return ' '.join(str(message).split())


def fail(message: Any, status: int = EXIT_USAGE) -> int:
  """Prints `error: <message>` (one line) on stderr and returns `status` (the exit status)."""
  print(f'error: {one_line(message)}', file=sys.stderr, flush=True)
  return status


def report_errors(
    call: Callable[[], Any], verbose: bool, errors: Sequence[type[BaseException]] = ()
) -> Any:
  """`call()`'s result; a user error (`user_errors()`, or one of `errors`) is printed as one line
  and gives EXIT_USAGE instead, unless `verbose` (then it propagates, with its traceback)."""
  try:
    return call()
  except (*user_errors(), *errors) as e:
    if verbose:
      raise
    return fail(e)


def verbose_requested(argv: Sequence[str]) -> bool:
  """Whether `--verbose` is on in `argv`, known before parsing (which itself may fail)."""
  value = False
  for arg in argv:
    if arg == '--':
      break
    name, eq, text = arg.lstrip('-').partition('=')
    if not arg.startswith('-'):
      continue
    if name == 'verbose':
      value = not eq or text.lower() in ('1', 't', 'true', 'y', 'yes')
    elif name in ('noverbose', 'no-verbose'):
      value = False
  return value


def flag_values() -> flags.FlagValues:
  """A tool's own flags, with `--verbose`."""
  fv = flags.FlagValues()
  define_verbose(fv)
  return fv


def define_verbose(fv: flags.FlagValues) -> None:
  if 'verbose' not in fv:
    flags.DEFINE_bool(
        'verbose', False, 'on an error, show its Python traceback (not one line)', flag_values=fv
    )


def define_keep_host_memory(fv: flags.FlagValues) -> None:
  """`--keep_host_memory`, the mode of `host_memory.apply`, for the programs that run JAX's train
  step (the trainer and the benchmark)."""
  if 'keep_host_memory' not in fv:
    flags.DEFINE_enum(
        'keep_host_memory',
        'off',
        list(host_memory.MODES),
        'Let the C allocator reuse freed memory instead of returning it (jaxreid.host_memory): a '
        'one-network CPU step stops faulting in fresh pages every step and runs faster, but '
        'two-network steps (MMT) ran slower, with more peak memory. auto: on for CPU-only runs.',
        flag_values=fv,
    )


def define_alias(fv: flags.FlagValues, old: str, name: str) -> None:
  """Accepts `--old` as a former spelling of `--name`; left out of `--help`."""
  flags.DEFINE_alias(old, name, flag_values=fv)


def output_path(path: str) -> str:
  """`path` (a file a tool writes) with its parent folders created; UsageError if they cannot
  be, or if `path` is a folder."""
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise UsageError(f'cannot write {path}: cannot create the folder {folder} ({e.strerror})')
  if os.path.isdir(path):
    raise UsageError(f'cannot write {path}: it is a folder (name a file)')
  return path


# ----------------------------------------------------------------------------------------------
# Running a tool


def run(
    main: Callable[..., int],
    fv: flags.FlagValues,
    argv: Sequence[str] | None,
    *,
    doc: str,
    required: Sequence[str] = (),
    args_name: str | None = None,
    errors: Sequence[type[BaseException]] = (),
) -> int:
  """Parses `argv` (without the program name; None: `sys.argv[1:]`) into `fv`, then returns
  `main()`'s exit status, or `main(args)`'s with the positional arguments when the tool takes
  some (`args_name`, e.g. 'WORKDIR': at least one). `required`: flags that must be given.
  `errors`: more exception types that mean bad input for this tool (module docstring)."""
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  if _wants_help(argv):
    sys.stdout.write(usage(fv, doc, required))
    return 0

  def parse_and_run():
    args = parse(fv, argv, required=required, takes_args=args_name is not None)
    if args_name is None:
      return main()
    if not args:
      raise UsageError(f'the following arguments are required: {args_name} (see --help)')
    return main(args)

  return report_errors(parse_and_run, verbose_requested(argv), errors)


def run_app(
    main: Callable[[list[str]], Any],
    *,
    doc: str,
    modules: Sequence[str],
    required: Sequence[str] = (),
    prepare: Callable[[list[str]], list[str]] | None = None,
) -> NoReturn:
  """`absl.app.run(main)` for a program on absl's global FLAGS (`jaxreid.main`,
  `jaxreid.tools.benchmark`), with `run`'s help and errors. `modules`: the names of the modules
  whose flags `--help` lists (absl's own logging and debugging flags still work but are not
  listed).
  `prepare(argv)`: checks / rewrites the arguments before parsing. Exits."""
  fv = flags.FLAGS
  argv = list(sys.argv)
  if _wants_help(argv[1:]):
    # absl files the flags of a module run as a script under its path
    modules = [argv[0] if m == '__main__' else m for m in modules]
    sys.stdout.write(usage(fv, doc, required, modules))
    sys.exit(0)
  verbose = verbose_requested(argv[1:])

  def parse_argv(argv):
    args = (prepare or list)(argv[1:])
    return [argv[0]] + parse(fv, args, required=required, takes_args=False)

  def flags_parser(argv):
    parsed = report_errors(lambda: parse_argv(argv), verbose)
    if not isinstance(parsed, list):
      sys.exit(parsed)
    return parsed

  app.run(lambda argv: report_errors(lambda: main(argv), verbose), flags_parser=flags_parser)


def parse(
    fv: flags.FlagValues, argv: list[str], *, required: Sequence[str] = (), takes_args: bool
) -> list[str]:
  """Parses `argv` (no program name) into `fv` from its defaults; returns the positional
  arguments. Raises UsageError for a bad command line."""
  head = argv[: argv.index('--')] if '--' in argv else argv
  argv = [_absl_negation(fv, a) for a in head] + argv[len(head) :]
  fv.unparse_flags()  # every call starts from the defaults
  try:
    args = fv(['jaxreid'] + argv)[1:]
  except flags.Error as e:
    raise UsageError(f'{one_line(e)} (see --help)') from e
  missing = [f'--{name}' for name in required if fv[name].value is None]
  if missing:
    raise UsageError(f'the following flags are required: {", ".join(missing)} (see --help)')
  if args and not takes_args:
    raise UsageError(f'unexpected arguments: {" ".join(args)} (see --help)')
  return args


def _wants_help(argv: Sequence[str]) -> bool:
  head = argv[: argv.index('--')] if '--' in argv else argv
  return any(a in HELP_ARGS for a in head)


def _absl_negation(fv: flags.FlagValues, arg: str) -> str:
  """'--no-ibn' -> '--noibn' for a boolean flag `ibn` (argparse's spelling, absl's meaning)."""
  name = arg[len('--no-') :]
  if arg.startswith('--no-') and name in fv and fv[name].boolean:
    return '--no' + name
  return arg


def usage(
    fv: flags.FlagValues,
    doc: str,
    required: Sequence[str] = (),
    modules: Sequence[str] | None = None,
) -> str:
  """The tool's docstring, its flags (those of `modules`, default: all), `--verbose` last, then
  the model overrides (if it has them). Aliases of former spellings are left out."""
  by_module = fv.flags_by_module_dict()
  if modules is not None:
    by_module = {m: by_module.get(m, []) for m in modules}
  listed = []
  for module, fs in by_module.items():
    for f in fs:
      if f not in listed and not f.help.startswith('Alias for --'):
        listed.append(f)
  shared = by_module.get(MODEL_FLAGS_MODULE, [])
  groups = {
      'flags': [f for f in listed if f not in shared or f.name not in MODEL_FLAGS],
      MODEL_GROUP: [f for f in listed if f in shared and f.name in MODEL_FLAGS],
  }
  groups['flags'].sort(key=lambda f: f.name == 'verbose')
  parts = [doc.strip()] + [
      f'{title}:\n' + '\n'.join(_flag_help(f, f.name in required) for f in fs)
      for title, fs in groups.items()
      if fs
  ]
  return '\n\n'.join(parts) + '\n'


def _flag_help(flag, required: bool) -> str:
  text = f'--{"[no]" if flag.boolean else ""}{flag.name}: {flag.help}'
  if required:
    text += ' (required)'
  elif flag.default is not None and flag.default != '':
    text += f' (default: {flag.default_as_str})'
  return flags.text_wrap(text, length=100, indent='      ', firstline_indent='  ')


# ----------------------------------------------------------------------------------------------
# Model flags (evaluate, search, export): `inference_flags` defines the overrides, which `usage`
# lists apart

MODEL_HELP = (
    'work dir of a finished run (its model.msgpack and config.json), a .msgpack, or a PyTorch file'
)
MODEL_GROUP = 'model overrides (replace config.json / what the weights imply)'
MODEL_FLAGS = ('arch', 'backbone', 'depth', 'width', 'ibn', 'height', 'img_width')
MODEL_FLAGS_MODULE = 'jaxreid.tools.inference_flags'
