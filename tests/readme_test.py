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
