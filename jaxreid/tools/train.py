"""`jaxreid-train`: `python -m jaxreid.main` as a console script (same flags, same behaviour).

  jaxreid-train --config=configs/mmt.py[:task] [--config.train.epochs=10] [--workdir=DIR]

The flags are defined in `jaxreid.main` (absl + ml_collections config flags); `--help` prints
that module's docstring and flags.
"""

from __future__ import annotations

from jaxreid import main as train_main


def main() -> None:
  """Runs the training entry point on the process's arguments (exits, as `absl.app.run`)."""
  train_main.run()


if __name__ == '__main__':
  main()
