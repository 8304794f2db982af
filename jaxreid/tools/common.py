"""What the command-line tools share: running a tool on absl flags, and the model flags.

Each tool defines its flags on a `flags.FlagValues` of its own rather than absl's global FLAGS,
so that tools can share a process (tests call several tools' `main(argv)` one after another,
each parse starting from the defaults) and a flag name can mean different things in two tools
(`jaxreid-convert --depth` defaults to 50; `jaxreid-evaluate --depth` only overrides when given).
`run` parses a tool's command line the way all these tools behave:

* `--help` (`-h`, `--helpfull`): the tool's docstring and its flags on stdout, exit status 0;
* a bad command line (unknown or missing flag, bad value): one line `error: ...` on stderr,
  exit status 2, nothing run;
* values as `--flag=value` or `--flag value`; boolean flags as absl's `--flag` / `--noflag` /
  `--flag=false`, and argparse's `--no-flag`.
"""

from __future__ import annotations

import sys
from typing import Callable
from typing import Sequence

from absl import app
from absl import flags

from jaxreid import models

HELP_ARGS = ('-h', '-?', '--help', '--helpshort', '--helpfull')
EXIT_USAGE = 2  # a bad command line or a user error (argparse's status, and jaxreid.main's)

# ----------------------------------------------------------------------------------------------
# Running a tool


def fail(message, status: int = EXIT_USAGE) -> int:
  """Prints `error: <message>` (one line) on stderr and returns `status` (the exit status)."""
  print(f'error: {message}', file=sys.stderr)
  return status


def run(
    main: Callable[..., int],
    fv: flags.FlagValues,
    argv: Sequence[str] | None,
    *,
    doc: str,
    required: Sequence[str] = (),
    args_name: str | None = None,
) -> int:
  """Parses `argv` (without the program name; None: `sys.argv[1:]`) into `fv`, then returns
  `main()`'s exit status, or `main(args)`'s with the positional arguments when the tool takes
  some (`args_name`, e.g. 'WORKDIR': at least one). `required`: flags that must be given."""
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  head = argv[: argv.index('--')] if '--' in argv else argv
  if any(a in HELP_ARGS for a in head):
    sys.stdout.write(usage(fv, doc, required))
    return 0
  argv = [_absl_negation(fv, a) for a in head] + argv[len(head) :]
  fv.unparse_flags()  # every call starts from the defaults
  try:
    args = fv(['jaxreid'] + argv)[1:]
  except flags.Error as e:
    return fail(f'{" ".join(str(e).split())} (see --help)')
  missing = [f'--{name}' for name in required if fv[name].value is None]
  if missing:
    return fail(f'the following flags are required: {", ".join(missing)} (see --help)')
  if args_name is None:
    if args:
      return fail(f'unexpected arguments: {" ".join(args)} (see --help)')
    return main()
  if not args:
    return fail(f'the following arguments are required: {args_name} (see --help)')
  return main(args)


def _absl_negation(fv: flags.FlagValues, arg: str) -> str:
  """'--no-ibn' -> '--noibn' for a boolean flag `ibn` (argparse's spelling, absl's meaning)."""
  name = arg[len('--no-') :]
  if arg.startswith('--no-') and name in fv and fv[name].boolean:
    return '--no' + name
  return arg


def usage(fv: flags.FlagValues, doc: str, required: Sequence[str] = ()) -> str:
  """The tool's docstring, its flags, then the model overrides (if it has them)."""
  by_module = fv.flags_by_module_dict()
  shared = by_module.get(__name__, [])
  groups = {
      'flags': [f for module, fs in by_module.items() if module != __name__ for f in fs]
      + [f for f in shared if f.name not in MODEL_FLAGS],
      MODEL_GROUP: [f for f in shared if f.name in MODEL_FLAGS],
  }
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


def run_absl_app(module, *, required: Sequence[str] = (), argv=None) -> None:
  """`app.run(module.main)` for a program that defines its flags on absl's global FLAGS
  (`jaxreid.main`, `jaxreid.benchmark`), as a console script: `--help` shows that module's
  docstring and flags and exits with 0 (absl's own `--help` lists the flags of `__main__`, which
  for a console script is the launcher, and exits with 1). Exits (as `app.run`)."""
  flags.mark_flags_as_required(list(required))

  def parse(argv):
    head = argv[1 : argv.index('--') if '--' in argv else None]
    if any(a in HELP_ARGS for a in head):
      listing = flags.FLAGS.module_help(module).split('\n')[2:]  # without the module's name
      sys.stdout.write(module.__doc__.strip() + '\n\nflags:\n' + '\n'.join(listing) + '\n')
      sys.exit(0)
    return app.parse_flags_with_usage(argv)

  app.run(module.main, argv=argv, flags_parser=parse)


# ----------------------------------------------------------------------------------------------
# Model and feature flags (evaluate, search; export: --model)

MODEL_HELP = (
    'work dir of a finished run (its model.msgpack and config.json), a .msgpack, or a PyTorch file'
)
MODEL_GROUP = 'model overrides (replace config.json / what the weights imply)'
MODEL_FLAGS = ('arch', 'backbone', 'depth', 'width', 'ibn', 'height', 'img_width')


def define_inference_flags(fv: flags.FlagValues, *, exported: str) -> None:
  """`--export_features` (`exported`: what is written besides the features), `--batch_size`
  and the model overrides (`MODEL_FLAGS`, all unset by default: `model_overrides`)."""
  flags.DEFINE_string(
      'export_features',
      '',
      f'a folder DIR: write features (.npy), {exported} into it',
      flag_values=fv,
  )
  flags.DEFINE_integer('batch_size', 256, 'images per feature batch', lower_bound=1, flag_values=fv)
  flags.DEFINE_enum(
      'arch', None, ['resnet', 'abmt'], 'one branch (ReIDNet) or two (ABMTNet)', flag_values=fv
  )
  flags.DEFINE_enum('backbone', None, models.BACKBONES, 'the backbone network', flag_values=fv)
  flags.DEFINE_integer(
      'depth', None, f'ResNet depth, one of {sorted(models.RESNET_SPECS)}', flag_values=fv
  )
  flags.DEFINE_integer('width', None, 'network width (64 = standard ResNet)', flag_values=fv)
  flags.DEFINE_bool('ibn', None, 'IBN-ResNet-a (--noibn: plain ResNet)', flag_values=fv)
  flags.DEFINE_integer('height', None, 'input height (default 256)', flag_values=fv)
  flags.DEFINE_integer('img_width', None, 'input width (default 128)', flag_values=fv)


def model_overrides(fv: flags.FlagValues) -> dict:
  """The model flags' values as `inference.load_model` overrides (unset ones are None: ignored)."""
  return {name: fv[name].value for name in MODEL_FLAGS}
