"""Checkpoints: a run's state saved with orbax-checkpoint, restored bit for bit.

A checkpoint directory holds one sub-directory per saved round
(``<dir>/<round>/``), each with three items:

* ``state``: the algorithm's whole pytree state (:class:`sfljax.state.SplitState`
  or :class:`sfljax.state.FLState`): both sides' parameters and optimizer
  states, per client where they are per client, and BatchNorm statistics;
* ``global``: the full global model's variables (what ``test_accuracy``
  evaluates), so a trained model loads for inference with no training data
  (:func:`load_model`);
* ``meta``: JSON, the round number, the run's config and the format version.

Nothing else is needed to continue exactly: every other random choice of a
round (the partition, the participants, the batches and their order, the
shared server's client order, client faults, augmentation and dropout keys) is
drawn from ``(seed, round)``, so the round number determines it.

Saves are atomic: orbax writes into a temporary directory and renames it when
the save is complete, so a process killed during a save leaves the previous
checkpoints intact and the half-written one is ignored (and removed by the
next save). ``keep`` bounds how many rounds are kept (oldest removed first).

Arrays are written uncompressed: orbax's zstd compression holds the whole
compressed checkpoint in memory until it is written (about the state's size
again: 0.4 GiB for SFLV1's 1000 server replicas' Adam states), and
parameters and optimizer moments barely compress (that run's checkpoint:
472 MB uncompressed, 410 MB compressed). Checkpoints written compressed (by
earlier versions) restore all the same.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

FORMAT = 1
"""Version of the layout above (stored in every ``meta``)."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the run (one line)."""


def _ocp():
  """orbax.checkpoint, imported on first use (it is heavy), with its INFO logs off."""
  import orbax.checkpoint as ocp
  logging.getLogger("absl").setLevel(logging.WARNING)
  return ocp


def _abstract(tree):
  """Shapes, dtypes and shardings of ``tree`` (the restore target)."""
  def one(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
  return jax.tree.map(one, tree)


def _is_empty(a) -> bool:
  return getattr(a, "size", 1) == 0


def _without_empty(tree):
  """``tree`` with its zero-size arrays (e.g. compacted optimizer states,
  :func:`sfljax.optimizers.compact`) replaced by None: they hold no values,
  and orbax does not save zero-size arrays."""
  return jax.tree.map(lambda a: None if _is_empty(a) else a, tree)


def _with_empty(like, restored):
  """``restored`` (a :func:`_without_empty` tree) with the zero-size arrays of
  ``like`` put back (their shapes, dtypes and shardings)."""
  def empty(a):
    z = np.zeros(a.shape, a.dtype)
    sharding = getattr(a, "sharding", None)
    if sharding is None:
      return z
    # Built per addressable shard: also for a sharding over several processes.
    return jax.make_array_from_callback(a.shape, sharding, lambda index: z[index])
  values = iter(jax.tree.leaves(restored, is_leaf=lambda x: x is None))
  leaves, treedef = jax.tree.flatten(like)
  out = []
  for a in leaves:
    got = next(values)
    out.append(empty(a) if _is_empty(a) else got)
  return jax.tree.unflatten(treedef, out)


def _restore_args(ocp, target, saved=None):
  """Restores the arrays as ``target`` (a tree of ShapeDtypeStructs) has them:
  shapes, dtypes, shardings; with no target, the tree of ``saved`` (an item's
  directory) as NumPy arrays."""
  if target is None:
    from etils import epath
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(saved)).tree
    return ocp.args.PyTreeRestore(restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(
      target))


class Checkpoints:
  """The checkpoints of one run, in ``directory`` (created on the first save).

  >>> ckpt = Checkpoints("runs/a/checkpoints", keep=2)
  >>> ckpt.save(10, state.algo, global_variables, {"config": cfg.to_dict()})
  >>> ckpt.latest()                       # 10
  >>> algo, meta = ckpt.restore(like=state.algo)
  """

  def __init__(self, directory: str, keep: int | None = 2):
    if keep is not None and keep < 1:
      raise ValueError(f"keep: at least 1 checkpoint, got {keep}")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = None

  def _mgr(self, create: bool = False):
    if self._manager is None:
      if not create and not os.path.isdir(self.directory):
        return None
      ocp = _ocp()
      arrays = ocp.PyTreeCheckpointHandler(use_compression=False)
      self._manager = ocp.CheckpointManager(
          self.directory,
          item_handlers={"state": arrays, "global": arrays,
                         "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                               enable_async_checkpointing=False))
    return self._manager

  def rounds(self) -> list[int]:
    """The rounds with a complete checkpoint, oldest first."""
    mgr = self._mgr()
    if mgr is None:
      return []
    mgr.reload()
    return sorted(int(s) for s in mgr.all_steps())

  def latest(self) -> int | None:
    """The newest complete checkpoint's round, or None."""
    rounds = self.rounds()
    return rounds[-1] if rounds else None

  def save(self, round_index: int, state: Any, global_variables: Any = None,
           meta: dict[str, Any] | None = None) -> str:
    """Saves round ``round_index`` (atomic); returns its directory."""
    ocp = _ocp()
    items = {"state": ocp.args.PyTreeSave(_without_empty(state)),
             "meta": ocp.args.JsonSave({"format": FORMAT, "round": int(round_index),
                                        **(meta or {})})}
    if global_variables is not None:
      items["global"] = ocp.args.PyTreeSave(global_variables)
    mgr = self._mgr(create=True)
    mgr.save(int(round_index), args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()
    return os.path.join(self.directory, str(int(round_index)))

  def meta(self, round_index: int | None = None) -> dict[str, Any]:
    """The ``meta`` item of a round (default: the newest)."""
    round_index = self._round(round_index)
    path = os.path.join(self.directory, str(round_index), "meta", "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: cannot read the checkpoint's meta data "
                            f"({getattr(e, 'strerror', None) or e})") from None

  def _round(self, round_index):
    if round_index is None:
      round_index = self.latest()
      if round_index is None:
        raise CheckpointError(f"{self.directory}: no complete checkpoint in it")
    elif round_index not in self.rounds():
      raise CheckpointError(f"{self.directory}: no checkpoint of round {round_index} "
                            f"(there are: {', '.join(map(str, self.rounds())) or 'none'})")
    return int(round_index)

  def restore(self, like: Any = None, round_index: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The state of a round (default: the newest) and its meta.

    ``like``: a state of the same structure (e.g. a fresh ``init``), whose
    shapes, dtypes and shardings the restored arrays take; a checkpoint of
    another structure raises :class:`CheckpointError`. ``like=None``: the
    arrays as nested dicts (for inspection).
    """
    round_index = self._round(round_index)
    ocp = _ocp()
    meta = self.meta(round_index)
    if meta.get("format") != FORMAT:
      raise CheckpointError(f"{self.directory}/{round_index}: checkpoint format "
                            f"{meta.get('format')!r}, this sfljax reads {FORMAT}")
    try:
      out = self._mgr().restore(round_index, args=ocp.args.Composite(
          state=_restore_args(ocp, None if like is None else _abstract(_without_empty(like)),
                            os.path.join(self.directory, str(round_index), "state"))))
      state = out["state"] if like is None else _with_empty(like, out["state"])
    except (ValueError, KeyError, TypeError, StopIteration) as e:
      first = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(f"{self.directory}/{round_index}: the checkpoint does not match "
                            f"this run's state ({first[:200]})") from None
    return state, meta

  def restore_global(self, round_index: int | None = None) -> Any:
    """The global model's variables saved with a round (default: the newest)."""
    round_index = self._round(round_index)
    ocp = _ocp()
    saved = os.path.join(self.directory, str(round_index), "global")
    if not os.path.isdir(saved):
      raise CheckpointError(f"{self.directory}/{round_index}: no global model saved")
    out = self._mgr().restore(round_index, args=ocp.args.Composite(
        **{"global": _restore_args(ocp, None, saved)}))
    return jax.tree.map(np.asarray, out["global"])

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None


def load_model(run_dir: str, round_index: int | None = None, *, model=None):
  """A trained global model from a run directory, for inference, with no training data.

  Returns ``(model, variables)``: the :class:`sfljax.models.SplitModel` (built
  from the run's ``config.json``: model name, input shape, classes, norm,
  dropout; or the ``model`` you pass, for a model made with
  ``SplitModel.from_modules``) and the global model's variables of the newest
  checkpoint (or of ``round_index``). Predict with
  ``sfljax.apply_part(model.full(), variables, x, train=False)[0]``.
  """
  from sfljax import conv_autotune, models
  path = os.path.join(run_dir, "config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
    cfg, resolved = stored["config"], stored["resolved"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: not an sfljax run's config "
                          f"({getattr(e, 'strerror', None) or e})") from None
  if model is None:
    model = models.get_model(cfg["model"], input_shape=tuple(resolved["input_shape"]),
                             num_classes=int(resolved["num_classes"]), norm=cfg.get("norm"),
                             dropout=cfg.get("dropout", 0.0),
                             conv_lowering=conv_autotune.policy(cfg.get("conv_lowering", "auto")))
  variables = Checkpoints(os.path.join(run_dir, "checkpoints")).restore_global(round_index)
  return model, variables
