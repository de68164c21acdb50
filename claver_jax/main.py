r"""Train, evaluate or test zero-shot: the command users run.

    python -m claver_jax.main --config=configs/NAME.py[:PRESET] --workdir=DIR [--config.KEY=VALUE]

`config.mode` selects 'train' (train + periodic eval: claver_jax.train), 'eval' (evaluate the
workdir's latest checkpoint, or config.init.checkpoint: claver_jax.run.evaluate_workdir) or
'zeroshot' (configs/zeroshot.py: claver_jax.zeroshot; `python -m claver_jax.zeroshot` is an
alias of this command for zero-shot configs). A second run with the same workdir resumes (under the
config it was trained with; see claver_jax/workdir.py); one started while another holds the
workdir stops at once. SIGTERM saves a checkpoint and exits 0. A config error (an unknown key, a bad value, keys that cannot
work together) is one line on stderr and exit status 2, before anything is written.

Several processes (one per host) run the same command: on Cloud TPU VMs, in Slurm job steps and
under mpirun they find each other; elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (see claver_jax/distributed.py and launch/). Process 0 logs and
writes metrics; every process takes part in checkpoints; SIGTERM on any process stops all of
them after the same step, with a checkpoint.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from claver_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/demo.py.',
                                          lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the model go.',
                    required=True)
flags.DEFINE_string('coordinator_address', '', 'Multi-process runs: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', 0, 'Multi-process runs: how many processes.')
flags.DEFINE_integer('process_id', -1, 'Multi-process runs: this process, 0..num_processes-1.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str], zeroshot_only: bool = False) -> None:
  """Runs config.mode; `zeroshot_only`: `python -m claver_jax.zeroshot`, zero-shot configs only."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if zeroshot_only and _CONFIG.value.mode != 'zeroshot':
    cli.fail(f'config.mode={_CONFIG.value.mode!r}: python -m claver_jax.zeroshot runs zero-shot '
             'configs (configs/zeroshot.py); run this one with python -m claver_jax.main.')
  absl_logging.get_absl_handler().setFormatter(logging.Formatter('%(levelname).1s %(message)s'))
  logging.getLogger('jax._src').setLevel(logging.WARNING)
  from claver_jax import distributed  # Before anything else touches JAX.
  try:
    setup = distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                   flags.FLAGS.process_id)
  except ValueError as e:
    sys.exit(f'error: {e}')
  import jax
  lead = jax.process_index() == 0  # Process 0 logs INFO; the others warnings and errors only.
  absl_logging.set_verbosity(absl_logging.INFO if lead else absl_logging.WARNING)
  for noisy in ('absl', 'orbax', 'grain'):  # Keep our own INFO lines readable.
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if jax.process_count() > 1:
    logging.info('Process 0 of %d (%s), %d of %d devices local.', jax.process_count(), setup,
                 jax.local_device_count(), jax.device_count())
  from claver_jax.checkpoint import CheckpointError
  from claver_jax.run_config import ConfigError
  from claver_jax.step import NonFiniteLossError
  from claver_jax.workdir import LOCK_NAME, WorkdirError
  workdir = Path(flags.FLAGS.workdir)
  created = not workdir.exists()
  try:
    try:
      if _CONFIG.value.mode == 'zeroshot':      # configs/zeroshot.py: prints its table.
        from claver_jax.zeroshot import run_zeroshot
        run_zeroshot(_CONFIG.value, flags.FLAGS.workdir)
        return
      if _CONFIG.value.mode == 'eval':
        from claver_jax.run import evaluate_workdir
        metrics = evaluate_workdir(_CONFIG.value, flags.FLAGS.workdir)
      else:
        from claver_jax.train import train_and_evaluate
        metrics = train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir)
    except ConfigError as e:
      cli.fail(str(e))
    except (NonFiniteLossError, WorkdirError, CheckpointError, ValueError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')
  except BaseException:
    # A run that failed before writing anything but its lock leaves no workdir behind.
    if created and lead and workdir.is_dir() and all(p.name == LOCK_NAME
                                                     for p in workdir.iterdir()):
      (workdir / LOCK_NAME).unlink(missing_ok=True)
      workdir.rmdir()
    raise
  if lead:
    from claver_jax.report import format_metrics
    print(f'Done. {format_metrics(metrics)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
