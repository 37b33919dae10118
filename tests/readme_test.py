"""The README's Python example runs as written."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_example_runs(capsys):
  text = open(README).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  history, exp, state = namespace["history"], namespace["exp"], namespace["state"]
  assert len(history) == 3 and state.round == 3
  assert 0.0 <= history[-1]["test_accuracy"] <= 1.0
  # Stepping by hand and sfljax.run give the same numbers.
  out = capsys.readouterr().out.strip().splitlines()
  last = out[-1].split()
  assert int(last[0]) == 3
  np.testing.assert_allclose(float(last[1]), history[-1]["train_loss"], rtol=1e-6)
  assert "params" in namespace["variables"]


def test_readme_own_model_optimizer_and_loss_example_runs():
  """The second example: a user Flax model split U-shaped, AdamW + cosine on the
  server, a label-smoothing loss, SFLV1 on digits."""
  text = open(README).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  namespace = {}
  exec(compile(blocks[1], "README.md", "exec"), namespace)
  exp, history = namespace["exp"], namespace["history"]
  assert exp.algorithm.composition.describe() == {
      "client_aggregation": "fedavg", "server": "replicas", "schedule": "synchronous",
      "labels": "client"}
  assert exp.cuts == (1, 4)
  assert exp.model.block_names[:2] == ("conv1", "conv2") and exp.model.has_batch_stats
  assert len(history) == 3 and all(np.isfinite(m["train_loss"]) for m in history)
  # It learns: digits after three rounds is far above chance (0.1).
  assert history[-1]["test_accuracy"] > 0.5
