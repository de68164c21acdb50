r"""Train or evaluate CLAVER: the command users run.

    python -m claver_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR [--config.KEY=VALUE]

`config.mode` selects 'train' (train + periodic eval) or 'eval' (evaluate the workdir's latest
checkpoint, or config.init.checkpoint). A second run with the same workdir resumes. SIGTERM
saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/demo.py.',
                                          lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the model go.',
                    required=True)
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.INFO)
  for noisy in ('absl', 'orbax', 'jax._src', 'grain'):  # Keep our own INFO lines readable.
    logging.getLogger(noisy).setLevel(logging.WARNING)
  absl_logging.get_absl_handler().setFormatter(logging.Formatter('%(levelname).1s %(message)s'))
  from claver_jax.train import NonFiniteLossError, train_and_evaluate
  try:
    metrics = train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir)
  except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}
  print(f'Done. {shown}')


if __name__ == '__main__':
  app.run(main)
