"""Client-major events update the [K, ...] per-client arrays in place.

An event of a client-major schedule (SL, SFLV2 in the official code's order)
reads one participant's rows of the per-client state and writes them back.
Written back right after the step, XLA copied the whole [K, ...] arrays
twice per event (about half of SL's round at 1000 clients); written back
just before the next event reads (``SplitCarry.pending``) they are updated
in place. This checks the compiled round: no loop body copies a [K, ...]
float array. (That the values are right is checked against whole-model
references elsewhere, e.g. ``algorithms_test``, ``compositions_test``.)
"""

import re

import numpy as np
import pytest

from conftest import small_digits
from sfljax.train import Config, Experiment

K = 24   # No other dimension of LeNet at batch 4 is 24.


def _loop_copies(**kw):
  """The ``copy`` instructions of f32[K, ...] arrays inside while-loop bodies."""
  parts = [np.arange(2 * k, 2 * (k + 1)) for k in range(K)]
  exp = Experiment(Config(clients=K, batch_size=4, rounds=1, **kw),
                   dataset=small_digits(2 * K, 8), parts=parts)
  state = exp.init()
  text = exp._programs["round"].lower(state.algo, exp.round_inputs(0)).compile().as_text()
  bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
  assert bodies, "the round has no loop"
  copies = []
  for comp in re.split(r"\n(?=%?[\w.\-]+ \()", text):
    name = re.match(r"%?([\w.\-]+)", comp.strip()).group(1)
    if name in bodies:
      copies += [line.strip() for line in comp.splitlines()
                 if re.search(rf"= f32\[{K},[^=]*\bcopy\(", line)]
  return copies


@pytest.mark.parametrize("kw", [{"algorithm": "sl"},
                                {"algorithm": "sflv2", "sflv2_order": "client"},
                                {"algorithm": "sl", "cut": "conv1,fc2"}])
def test_client_major_round_copies_no_per_client_array(kw):
  assert _loop_copies(**kw) == []


@pytest.mark.parametrize("kw", [{"algorithm": "sflv1", "client_block": 1},
                                {"algorithm": "sflv1", "client_block": 5},
                                {"algorithm": "sflv2", "client_block": 1}])
def test_client_blocks_copy_no_per_client_array(kw):
  """A synchronous step run block by block reads each block's rows and writes
  them back; written back at once, blocks of one client copied the [K, ...]
  arrays whole (SFLV1 at 1000 clients: 145 s per round against 6 s)."""
  assert _loop_copies(strategy="sequential", **kw) == []
