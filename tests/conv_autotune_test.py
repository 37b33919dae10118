"""Tests of sfljax.conv_autotune: the measured lowering policy and its cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sfljax import conv, conv_autotune, models
from sfljax.conv_autotune import Autotune

X_SHAPE, W_SHAPE = (4, 8, 8, 3), (3, 3, 3, 5)
PADS = ((1, 1), (1, 1))


def _times(fast: str) -> dict:
  """Timings where ``fast`` takes 1 ms in every part and the others 10 ms."""
  return {p: {m: (1.0 if m == fast else 10.0) * 1e-3 for m in conv.METHODS}
          for p in conv_autotune.PARTS}


def test_choose_keeps_the_rule_unless_beaten_by_more_than_the_margin():
  rule = ("xla", "patches", "patches")
  t = {"fwd": {"xla": 1.0, "patches": 0.95, "taps": 2.0},     # 5% faster: keep the rule
       "dx": {"xla": 0.5, "patches": 1.0, "taps": 2.0},       # 50% faster: take it
       "dw": {"xla": 3.0, "patches": 1.0, "taps": 0.89}}      # 11% faster: take it
  assert conv_autotune.choose(t, rule) == ("xla", "xla", "taps")


def test_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
  cache = tmp_path / "c.json"
  calls = []

  def fake_measure(*args, **kwargs):
    calls.append(args)
    return _times("taps")
  monkeypatch.setattr(conv_autotune, "measure", fake_measure)
  policy = Autotune(cache=str(cache))
  assert policy(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32) == ("taps",) * 3
  assert len(calls) == 1
  stored = json.loads(cache.read_text())
  (machine, entries), = stored.items()
  assert machine == conv_autotune.machine_key()
  (entry,), = [list(entries.values())]
  assert entry["lowering"] == ["taps"] * 3
  assert entry["rule"] == list(conv.auto_lowering(X_SHAPE, W_SHAPE, (1, 1), PADS))
  # A second policy (another process, another run) reads it and measures nothing.
  monkeypatch.setattr(conv_autotune, "measure", lambda *a, **k: pytest.fail("measured again"))
  again = Autotune(cache=str(cache))
  assert again(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32) == ("taps",) * 3
  assert list(again.used.values()) == [["taps"] * 3]
  # Another machine's entries do not count.
  stored = {"another machine": entries}
  cache.write_text(json.dumps(stored))
  monkeypatch.setattr(conv_autotune, "measure", lambda *a, **k: _times("xla"))
  assert Autotune(cache=str(cache))(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32) == ("xla",) * 3
  assert set(json.loads(cache.read_text())) == {"another machine", conv_autotune.machine_key()}


def test_an_entry_written_meanwhile_is_kept_not_overwritten(tmp_path, monkeypatch):
  """Two processes measuring the same convolution: the first entry stays,
  so every run on this cache uses the same lowering."""
  cache = tmp_path / "c.json"
  key = conv_autotune.conv_key(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32)

  def measure_while_another_writes(*args, **kwargs):
    cache.write_text(json.dumps({conv_autotune.machine_key(): {
        key: {"lowering": ["patches"] * 3}}}))
    return _times("taps")
  monkeypatch.setattr(conv_autotune, "measure", measure_while_another_writes)
  assert Autotune(cache=str(cache))(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32) == \
      ("patches",) * 3


def test_the_measured_choice_is_what_runs_inside_jit_and_grad(tmp_path, monkeypatch):
  """Bit for bit the explicit triple the policy chose (so the policy is what
  decided), and close to XLA's convolution."""
  monkeypatch.setattr(conv_autotune, "measure", lambda *a, **k: _times("taps"))
  policy = Autotune(cache=str(tmp_path / "c.json"))
  x = jax.random.normal(jax.random.key(0), X_SHAPE)
  w = jax.random.normal(jax.random.key(1), W_SHAPE)

  def loss(lowering):
    return jax.jit(jax.value_and_grad(
        lambda x_, w_: jnp.sum(jnp.sin(conv.conv2d(x_, w_, padding=PADS, lowering=lowering))),
        argnums=(0, 1)))(x, w)
  got, ref = loss(policy), loss(("taps", "taps", "taps"))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  xla = jax.value_and_grad(lambda x_, w_: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x_, w_, (1, 1), PADS, dimension_numbers=("NHWC", "HWIO", "NHWC")))), argnums=(0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(xla)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_real_measurement_while_tracing_a_model(tmp_path):
  """No fake: LeNet built with the policy measures its two convolutions during
  the first trace (inside jit), caches them, and gives the default model's
  outputs up to float rounding."""
  cache = tmp_path / "c.json"
  policy = Autotune(cache=str(cache), repeats=1)
  tuned = models.get_model("lenet", conv_lowering=policy)
  plain = models.get_model("lenet")
  variables = plain.init(jax.random.key(0), 2)
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  f = lambda m: jax.jit(lambda v, a: models.apply_part(m.full(), v, a, train=False)[0])
  np.testing.assert_allclose(np.asarray(f(tuned)(variables, x)),
                             np.asarray(f(plain)(variables, x)), rtol=1e-4, atol=1e-5)
  entries = json.loads(cache.read_text())[conv_autotune.machine_key()]
  assert len(entries) == 2 and len(policy.used) == 2
  for entry in entries.values():
    assert set(entry["ms"]) == {"fwd", "dx", "dw"}
    assert all(set(t) == set(conv.METHODS) and min(t.values()) > 0 for t in entry["ms"].values())
    assert all(m in conv.METHODS for m in entry["lowering"])


def test_measure_times_only_the_parts_and_methods_asked_for(monkeypatch):
  """A first layer's input gradient is never run; a mapping picks methods per part."""
  def no_input_grad(*a, **k):
    raise AssertionError("the input gradient was timed")
  monkeypatch.setattr(conv, "_input_grad", no_input_grad)
  t = conv_autotune.measure(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32, repeats=1,
                            methods={"fwd": ("taps",), "dw": ("patches", "xla")},
                            parts=("fwd", "dw"))
  assert {p: sorted(v) for p, v in t.items()} == {"fwd": ["taps"], "dw": ["patches", "xla"]}
  assert all(s > 0 for v in t.values() for s in v.values())
  with pytest.raises(ValueError, match="unknown parts"):
    conv_autotune.measure(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32, parts=("bwd",))
  with pytest.raises(ValueError, match=r"no methods for parts \['dw'\]"):
    conv_autotune.measure(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32,
                          methods={"fwd": ("taps",)}, parts=("fwd", "dw"))


def test_a_policy_returning_nonsense_is_refused():
  with pytest.raises(ValueError, match="returned"):
    conv.conv2d(jnp.zeros(X_SHAPE), jnp.zeros(W_SHAPE), lowering=lambda *a: ("fast",) * 3)


def test_a_corrupt_cache_entry_says_how_to_fix_it(tmp_path):
  cache = tmp_path / "c.json"
  key = conv_autotune.conv_key(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32)
  cache.write_text(json.dumps({conv_autotune.machine_key(): {key: {"lowering": ["gpu"]}}}))
  with pytest.raises(ValueError, match="delete the file"):
    Autotune(cache=str(cache))(X_SHAPE, W_SHAPE, (1, 1), PADS, jnp.float32)


def test_cli_autotune_records_its_choices_and_reruns_bit_for_bit(tmp_path, monkeypatch):
  """--conv-lowering autotune: the choices go into summary.json, and a second
  run on the same cache measures nothing and logs the same numbers."""
  from sfljax.cli import main
  monkeypatch.setenv("SFLJAX_CONV_CACHE", str(tmp_path / "cache.json"))
  monkeypatch.setattr(conv_autotune, "measure", lambda *a, **k: _times("patches"))
  runs = []
  for name in ("a", "b"):
    out = tmp_path / name
    assert main(["train", "--conv-lowering", "autotune", "--clients", "2", "--rounds", "1",
                 "--out", str(out), "--quiet"]) == 0
    monkeypatch.setattr(conv_autotune, "measure",
                        lambda *a, **k: pytest.fail("measured again"))
    summary = json.loads((out / "summary.json").read_text())
    runs.append(((out / "metrics.jsonl").read_text().splitlines(), summary))
  (metrics_a, summary_a), (metrics_b, summary_b) = runs
  used = summary_a["conv_lowerings"]   # LeNet's two convolutions at each batch size traced
  assert {k.split(" ")[1] for k in used} == {"w5x5x1x6", "w5x5x6x16"}
  assert "x32x28x28x1 w5x5x1x6 s1x1 p2,2,2,2 float32" in used      # a training batch
  assert all(v == ["patches"] * 3 for v in summary_a["conv_lowerings"].values())
  assert summary_b["conv_lowerings"] == summary_a["conv_lowerings"]
  strip = lambda lines: [{k: v for k, v in json.loads(l).items() if "seconds" not in k}
                         for l in lines]
  assert strip(metrics_a) == strip(metrics_b)


def test_autotune_is_refused_with_several_processes(monkeypatch):
  """Each process would measure on its own and could compile another program."""
  from sfljax.config import Config, ConfigError
  from sfljax.train import Experiment
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match="several processes"):
    Experiment(Config(conv_lowering="autotune", rounds=1))
