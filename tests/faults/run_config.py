"""The run every fault test trains: a tiny transformer on the text file named by the arg.

--config=tests/faults/run_config.py:/path/to/corpus.txt
"""

from tests.helpers import tiny_config


def get_config(path: str):
  c = tiny_config(path)
  c.num_train_steps = 120  # long enough to be interrupted, seconds on a CPU
  c.log_every_steps = 1  # every step's loss is compared across interruptions
  c.eval_every_steps = 120
  c.checkpoint_every_steps = 20
  c.optim.decay_steps = 120  # the schedule does not depend on where a run stops
  return c
