"""Shared test fixtures: small real datasets and an independent reference trainer."""

import dataclasses
import os
import tempfile

# Compilation, not running, is most of this suite's time on CPU (small models, many
# distinct programs): XLA's CPU backend compiles with its LLVM optimisations lowered,
# which cuts the suite's time by about a fifth. It changes how fast the compiled code
# runs and where float32 rounding falls, not the operations computed; every comparison
# below is made between programs compiled the same way. SFLJAX_TEST_FULL_XLA=1 runs the
# suite with XLA's defaults instead.
# Set before JAX starts its backend; inherited by the CLI runs tests start.
if os.environ.get("SFLJAX_TEST_FULL_XLA") != "1":
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfljax import data

# Many tests build the same small experiments (same shapes, so the same programs): XLA's
# persistent compilation cache, keyed by the compiled program itself, lets the later ones
# reuse a compilation instead of repeating it. Nothing is shared between programs that differ.
# One cache for the whole test run: both xdist workers and the CLI runs they start as
# subprocesses (through the JAX_* variables, which JAX reads at import). A size limit turns
# on JAX's file lock around every read and write (the filelock package), so a process never
# reads an entry another one is still writing.
_CACHE = os.environ.get("SFLJAX_TEST_COMPILATION_CACHE") or os.path.join(
    tempfile.gettempdir(),
    "sfljax-xla-cache-" + os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_compilation_cache_max_size", 8 << 30)


@pytest.fixture(scope="session")
def digits():
  return data.load_digits(0)


@pytest.fixture
def torch_one_thread():
  """PyTorch on one thread for the test (its tests compare numbers, not speed)."""
  torch = pytest.importorskip("torch")
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(old)


def small_digits(n_train: int = 48, n_test: int = 24) -> data.Dataset:
  """A slice of the real digits (28x28) so each test compiles and runs fast."""
  ds = data.load_digits(0)
  return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                             x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])


def reference_train(model, variables, x, y, batches, opt, opt_state=None):
  """Whole-model training with ``jax.grad`` on the given batches, one by one.

  Independent of the split/vmap code under test: plain Flax apply with
  mutable batch stats, mean cross-entropy over each batch, optax update.
  Returns (variables, opt_state).
  """
  module = model.full()
  params = variables["params"]
  stats = variables.get("batch_stats")
  opt_state = opt.init(params) if opt_state is None else opt_state

  def loss_fn(p, s, xb, yb):
    v = {"params": p} if s is None else {"params": p, "batch_stats": s}
    if s is None:
      logits = module.apply(v, xb, train=True)
      new_s = None
    else:
      logits, upd = module.apply(v, xb, train=True, mutable=["batch_stats"])
      new_s = upd["batch_stats"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_s

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  for b in batches:
    g, new_stats = grad_fn(params, stats, jnp.asarray(x[b]), jnp.asarray(y[b]))
    updates, opt_state = opt.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats = new_stats if stats is not None else None
  out = {"params": params}
  if stats is not None:
    out["batch_stats"] = stats
  return out, opt_state


def client_batches(idx, mask, k):
  """Client k's real batches from a batch schedule, as index arrays."""
  return [idx[k, t][mask[k, t]] for t in range(idx.shape[1]) if mask[k, t].any()]


def assert_trees_close(a, b, atol=1e-5, rtol=1e-4):
  ja, jb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert ja == jb, (ja, jb)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
