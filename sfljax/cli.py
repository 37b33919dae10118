"""Command line: ``sfljax train ...`` (also ``python -m sfljax train ...``).

Thin by design: it parses flags into a :class:`sfljax.config.Config` (the
flags of ``train`` and ``partition`` are made from the Config's fields, see
:func:`sfljax.config.options`; only the flags that do not change the numbers
are written here), checks the output directory, runs
:class:`sfljax.train.Experiment` and writes ``config.json``, ``metrics.jsonl``
(one line per finished round) and ``summary.json``. Bad input ends with one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

EXIT_USAGE = 2


class UsageError(Exception):
  """A bad flag value: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line, no usage dump.
    raise UsageError(message)


PARTITION_FIELDS: tuple[str, ...] = ("dataset", "data_dir", "clients", "partition", "alpha",
                                     "shards_per_client", "classes_per_client",
                                     "min_client_size", "seed")
"""The Config fields that ``sfljax partition`` takes."""


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="sfljax", description="SplitFed learning in JAX")
  sub = p.add_subparsers(dest="command", parser_class=_Parser)
  sub.required = True
  t = sub.add_parser("train", help="train one configuration and log per-round metrics")
  _config_options(t)
  t.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 help="multi-host: process 0's address (same on every host)")
  t.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
  t.add_argument("--process-id", type=int, default=None, help="multi-host: this process's rank")
  t.add_argument("--distributed-auto", action="store_true",
                 help="multi-host: take coordinator, count and rank from the environment "
                      "(Cloud TPU, SLURM, Open MPI)")
  t.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
  t.add_argument("--overwrite", action="store_true",
                 help="replace an existing run directory given by --out")
  t.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  q = sub.add_parser("partition", help="show (and plot) how the training set splits among clients")
  _config_options(q, PARTITION_FIELDS)
  q.add_argument("--plot", default=None, metavar="PNG",
                 help="write the per-client label chart here")
  return p


def _config_options(p, names=None) -> None:
  """Adds the flags of the Config fields ``names`` (default: all), made from the
  schema in :mod:`sfljax.config`; each flag stores into the field's name."""
  from sfljax import config
  for o in config.options(names):
    text = o.help.replace("%", "%%")   # argparse formats help strings with %.
    if o.type is None:                 # A bool: the flag flips the default.
      p.add_argument(o.flag, dest=o.field, default=o.default,
                     action="store_false" if o.default else "store_true", help=text)
      continue
    if o.default is not None:
      text += f" (default: {o.default})"
    p.add_argument(o.flag, dest=o.field, type=o.type, default=o.default, choices=o.choices,
                   metavar=o.metavar, help=text)


def _partition(args) -> int:
  from sfljax import partitions
  from sfljax.config import ConfigError
  try:
    cfg = _config(args).validate()
    ds = _load(cfg)
    parts = cfg.client_partition(ds.y_train)
  except ConfigError as e:
    raise UsageError(e.cli_message) from None
  counts = partitions.label_counts(ds.y_train, parts, ds.num_classes)
  print("client  samples  " + " ".join(f"{c:>5d}" for c in range(ds.num_classes)))
  for k, row in enumerate(counts):
    print(f"{k:6d}  {int(row.sum()):7d}  " + " ".join(f"{int(v):5d}" for v in row))
  if args.plot:
    try:
      partitions.plot_partition(ds.y_train, parts, args.plot, num_classes=ds.num_classes,
                                title=f"{cfg.dataset}: {cfg.partition} partition, "
                                      f"{cfg.clients} clients")
    except OSError as e:
      raise UsageError(f"--plot: cannot write {args.plot}: {e.strerror or e}") from None
    except partitions.PartitionError as e:
      raise UsageError(str(e)) from None
    print(f"plot written to {args.plot}")
  return 0


def _config(args):
  """A Config from the parsed flags (each flag named like a Config field)."""
  import dataclasses
  from sfljax.config import Config
  return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if hasattr(args, f.name)})


def _load(cfg):
  """The config's dataset, with loading problems as one-line usage errors."""
  from sfljax import data
  from sfljax.config import ConfigError
  try:
    return data.load_dataset(cfg.dataset, seed=cfg.seed, data_dir=cfg.data_dir)
  except ConfigError as e:
    raise UsageError(e.cli_message) from None
  except ValueError as e:
    raise UsageError(f"--data-dir: {e}") from None


def _check_out(out: str | None, overwrite: bool) -> str:
  """Picks and checks the output directory (creates nothing); never loses a run."""
  if out is None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join("runs", stamp)
    n = 1
    while os.path.exists(out):
      n += 1
      out = os.path.join("runs", f"{stamp}-{n}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out: {out} exists and is not a directory; choose another path")
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise UsageError(f"--out: {out} is not empty; choose another directory or pass --overwrite")
    if not os.path.exists(os.path.join(out, "config.json")):
      raise UsageError(f"--out: {out} holds files but no config.json, so it is not an sfljax "
                       "run; refusing to replace it, choose another directory")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UsageError(f"--out: cannot write to {out}: {parent} is not a writable directory")
  return out


def _create_out(out: str) -> None:
  try:
    os.makedirs(out, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "summary.json"):  # Only with --overwrite.
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
  except OSError as e:
    raise UsageError(f"--out: cannot write to {out}: {e.strerror or e}") from None


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class _Progress:
  """A one-line progress bar on a terminal; silent otherwise."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()

  def update(self, m) -> None:
    if not self.enabled:
      return
    done = m["round"]
    width = 30
    bar = "#" * (width * done // self.total) + "-" * (width - width * done // self.total)
    sys.stderr.write(f"\rround {done}/{self.total} [{bar}] loss {m['train_loss']:.4f} "
                     f"test acc {m['test_accuracy']:.4f} ({time.perf_counter() - self.t0:.0f}s)")
    if done == self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def _initialize(args) -> bool:
  """Joins a multi-process run if asked to; True on the process that writes results."""
  from sfljax import distributed
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           auto_detect=args.distributed_auto)
  except (ValueError, RuntimeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UsageError(msg if msg.startswith("--") else f"--coordinator-address: {msg}") from None
  return distributed.is_main_process()


def _train(args) -> int:
  from sfljax.config import ConfigError
  from sfljax.train import Experiment, environment
  cfg = _config(args)
  try:
    cfg.validate()
    writer = _initialize(args)
    out = _check_out(args.out, args.overwrite) if writer else None
    exp = Experiment(cfg, dataset=_load(cfg))
  except ConfigError as e:
    raise UsageError(e.cli_message) from None
  if not writer:  # Other processes of a multi-host run compute; process 0 writes.
    exp.run()
    return 0
  _create_out(out)
  resolved = {"cut": exp.cut, "strategy": exp.executor.name,
              "client_sizes": [int(n) for n in exp.client_data.counts],
              "block_names": list(exp.model.block_names),
              "input_shape": list(exp.dataset.input_shape),
              "train_samples": int(len(exp.dataset.y_train)),
              "test_samples": int(len(exp.dataset.y_test)),
              "steps_per_round": int(exp.steps_per_round)}
  comp = getattr(exp.algorithm, "composition", None)
  if comp is not None:
    resolved["composition"] = comp.describe()
  _write_json(os.path.join(out, "config.json"),
              {"config": cfg.to_dict(), "resolved": resolved, "environment": environment()})
  if not args.quiet:
    print(f"sfljax: training {cfg.algorithm} / {cfg.model} on {cfg.dataset} with "
          f"{cfg.clients} clients for {cfg.rounds} rounds; writing to {out}", file=sys.stderr)
  progress = _Progress(cfg.rounds, enabled=not args.quiet and sys.stderr.isatty())
  history = []
  with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    def log(m):
      history.append(m)
      f.write(json.dumps(m, sort_keys=True) + "\n")
      f.flush()
      progress.update(m)
    exp.run(callback=log)
  best = max(history, key=lambda m: m["test_accuracy"])
  summary = {"best_test_accuracy": best["test_accuracy"], "best_round": best["round"],
             "final_test_accuracy": history[-1]["test_accuracy"],
             "compile_seconds": exp.compile_seconds,
             "train_seconds": sum(m["seconds"] for m in history)}
  _write_json(os.path.join(out, "summary.json"), summary)
  if not args.quiet:
    print(f"best test accuracy {best['test_accuracy']:.4f} (round {best['round']}), "
          f"final {history[-1]['test_accuracy']:.4f}; compile {exp.compile_seconds:.1f}s, "
          f"training {summary['train_seconds']:.1f}s; results in {out}")
  return 0


def main(argv=None) -> int:
  try:
    args = _parser().parse_args(argv)
    return _partition(args) if args.command == "partition" else _train(args)
  except UsageError as e:
    print(f"sfljax: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print("sfljax: interrupted; rounds finished so far are in metrics.jsonl", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
