"""LeNet conv1 forward (+ ReLU + pool) inside a lax.scan of 4 calls, ms per call.

Usage: python components_fwd.py BATCH. "taps" is the library's: run with PYTHONPATH at commit
28b5c4e for the numbers before the change; "planar" is the new formulation written out here."""
import sys, time, statistics, jax, jax.numpy as jnp, numpy as np
from jax import lax
from sfljax import conv, models
B = int(sys.argv[1])
xs, ws, pads = (B, 28, 28, 1), (5, 5, 1, 6), ((2, 2), (2, 2))
rs = np.random.RandomState(0)
x = jnp.asarray(rs.randn(*xs).astype(np.float32))
w = jnp.asarray(rs.randn(*ws).astype(np.float32))
b = jnp.asarray(rs.randn(6).astype(np.float32))

def taps(x, w):
  return conv._fwd("taps", x, w, (1, 1), pads)

def planar(x, w):
  xp = jnp.pad(x[..., 0], ((0, 0), (2, 2), (2, 2)))
  chans = []
  for c in range(6):
    acc = None
    for i in range(5):
      for j in range(5):
        t = xp[:, i:i + 28, j:j + 28] * w[i, j, 0, c]
        acc = t if acc is None else acc + t
    chans.append(acc)
  return jnp.stack(chans, axis=-1)

def block(f):
  def g(x, w):
    y = jax.nn.relu(f(x, w) + b)
    return models.max_pool_2x2(y)
  return g

for name, f in {"taps": taps, "planar": planar}.items():
  for wrap in ("conv", "conv+relu+pool"):
    ff = f if wrap == "conv" else block(f)
    def body(c, xi):
      return c + jnp.sum(ff(xi, w)), None
    xs_ = jnp.stack([x * (1 - 0.01 * k) for k in range(4)])
    prog = jax.jit(lambda xs_: lax.scan(body, 0.0, xs_)[0])
    prog(xs_).block_until_ready()
    ts = []
    for _ in range(5):
      t0 = time.perf_counter(); prog(xs_).block_until_ready(); ts.append((time.perf_counter() - t0) / 4)
    err = float(np.max(np.abs(np.asarray(f(x, w)) - np.asarray(taps(x, w)))))
    print(f"B={B} {name:7s} {wrap:15s} {statistics.median(ts)*1e3:8.2f} ms  maxdiff-vs-taps {err:.1e}", flush=True)
