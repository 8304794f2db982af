"""`jaxreid-train`: `python -m jaxreid.main` as a console script (same flags, same behaviour).

  jaxreid-train --config=configs/mmt.py[:task] [--config.train.epochs=10] [--workdir=DIR]

The flags are defined in `jaxreid.main` (absl + ml_collections config flags); see `--help`.
"""

from __future__ import annotations

from jaxreid import main as train_main
from jaxreid.tools import common


def main() -> None:
  """Runs the training entry point on the process's arguments (exits, as `absl.app.run`)."""
  common.run_absl_app(train_main, required=['config'])


if __name__ == '__main__':
  main()
