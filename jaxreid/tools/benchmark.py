"""`jaxreid-benchmark`: `python -m jaxreid.benchmark` as a console script (same flags).

  jaxreid-benchmark --methods=pretrain,mmt --dtypes=float32,bfloat16 --steps=5

The flags are defined in `jaxreid.benchmark` (absl); `--help` prints that module's docstring and
flags.
"""

from __future__ import annotations

from jaxreid import benchmark


def main() -> None:
  """Runs the benchmark on the process's arguments (exits, as `absl.app.run`)."""
  benchmark.run()


if __name__ == '__main__':
  main()
