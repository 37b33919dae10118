"""Kernel-gradient formulations of one layer inside a lax.scan of 4 calls (ms per call).

Usage: python components_dw.py BATCH {conv1,conv2}. (The stem and 3x3 64->64 rows of
results.md came from the same script with those layers added to its dict.) "patches"/"taps"/"xla" are the library's own
formulations: run with PYTHONPATH at commit 28b5c4e for the numbers before the change;
"stacked" is the new formulation written out here."""
import sys, time, statistics, jax, jax.numpy as jnp, numpy as np
from jax import lax
from sfljax import conv
B = int(sys.argv[1]); which = sys.argv[2]
layers = {"conv1": ((B, 28, 28, 1), (5, 5, 1, 6), ((2, 2), (2, 2))),
          "conv2": ((B, 14, 14, 6), (5, 5, 6, 16), ((0, 0), (0, 0)))}
xs, ws, pads = layers[which]
s = (1, 1)
rs = np.random.RandomState(0)
x = jnp.asarray(rs.randn(*xs).astype(np.float32))
ho = xs[1] + sum(pads[0]) - ws[0] + 1
g = jnp.asarray(rs.randn(xs[0], ho, ho, ws[3]).astype(np.float32))

def stacked(g, x):
  kh, kw, cin, cout = ws
  def f(xc, gc):
    xp = conv._pad_x(xc, pads)
    taps = jnp.stack([conv._tap(xp, i, j, s, ho, ho) for i in range(kh) for j in range(kw)])
    return lax.dot_general(taps, gc, (((1, 2, 3), (0, 1, 2)), ((), ())))
  cs = conv._chunk_size(x.shape[0], ho * ho * kh * kw * cin * 4)
  return conv._sum_batch(f, cs, x, g).reshape(ws)

fns = {m: (lambda m: lambda g, x: conv._kernel_grad(m, g, x, ws, jnp.float32, s, pads))(m)
       for m in ("xla", "patches", "taps")}
fns["stacked"] = stacked
ref = np.asarray(fns["xla"](g, x), np.float64)
res = {}
for name, f in fns.items():
  # inside a scan of 4 calls, like the training programs
  def body(c, a):
    return c + f(*a), None
  gs = jnp.stack([g * (1 + 0.01 * k) for k in range(4)])
  xs_ = jnp.stack([x * (1 - 0.01 * k) for k in range(4)])
  prog = jax.jit(lambda gs, xs_: lax.scan(body, jnp.zeros(ws), (gs, xs_))[0])
  out = prog(gs, xs_); out.block_until_ready()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter(); prog(gs, xs_).block_until_ready(); ts.append((time.perf_counter() - t0) / 4)
  err = float(np.max(np.abs(np.asarray(f(g, x), np.float64) - ref)) / np.max(np.abs(ref)))
  res[name] = statistics.median(ts) * 1e3
  print(f"{which} B={B} {name:8s} {res[name]:8.2f} ms/call  relerr {err:.1e}", flush=True)
