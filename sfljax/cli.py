"""Command line: ``sfljax train|partition|plot|summary ...`` (also ``python -m sfljax``).

Thin by design: it parses flags into a :class:`sfljax.config.Config` (the
flags of ``train`` and ``partition`` are made from the Config's fields, see
:func:`sfljax.config.options`; only the flags that do not change the numbers
are written here), claims the output directory (:mod:`sfljax.rundir`), runs
:class:`sfljax.train.Experiment` round by round and writes ``config.json``,
``metrics.jsonl`` (one line per finished round), TensorBoard scalars,
checkpoints (:mod:`sfljax.checkpoint`) and ``summary.json``.

Exit codes: 0 done; 2 bad input (one line on stderr, nothing written or
changed); 3 stopped on a NaN/Inf (``--on-nonfinite stop``); 130 Ctrl-C and
143 SIGTERM (the finished rounds kept and checkpointed, ``--resume`` goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

EXIT_USAGE = 2


class UsageError(Exception):
  """A bad flag value: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # One line naming the flag first, no usage dump.
    message = re.sub(r"^argument (--[\w-]+)(?:/-\w+)?: ", r"\1: ", message)
    if message.endswith("expected one argument"):
      message += " (a value starting with '-' goes as --flag=VALUE)"
    raise UsageError(message)


PARTITION_FIELDS: tuple[str, ...] = ("dataset", "data_dir", "clients", "partition", "alpha",
                                     "shards_per_client", "classes_per_client",
                                     "min_client_size", "seed")
"""The Config fields that ``sfljax partition`` takes."""


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="sfljax", description="SplitFed learning in JAX", allow_abbrev=False)
  sub = p.add_subparsers(dest="command", parser_class=_Parser)
  sub.required = True
  t = sub.add_parser("train", help="train one configuration and log per-round metrics",
                     allow_abbrev=False)
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
                 help="replace the sfljax run in --out (moved aside until the new run has "
                      "finished a round, then deleted)")
  t.add_argument("--resume", default=None, metavar="DIR",
                 help="continue the run in DIR from its last checkpoint, with its stored "
                      "settings (only --quiet, --checkpoint-every, --keep-checkpoints may be "
                      "given with it)")
  t.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                 help="save a checkpoint every N rounds, and always after the last round and "
                      "on Ctrl-C/SIGTERM (0: only then) (default: 10)")
  t.add_argument("--keep-checkpoints", type=int, default=2, metavar="K",
                 help="keep the newest K checkpoints (default: 2)")
  t.add_argument("--quiet", action="store_true", help="no progress line or summary")
  from sfljax import report
  report.add_commands(sub, _Parser)
  q = sub.add_parser("partition", help="show (and plot) how the training set splits among clients",
                     allow_abbrev=False)
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


class _Progress:
  """One progress line on a terminal (round, losses, s/round, time left); silent
  under ``--quiet`` and when stderr is not a terminal (no control characters in logs)."""

  def __init__(self, total: int, first: int, enabled: bool):
    self.total, self.first, self.enabled = total, first, enabled
    self.t0 = time.perf_counter()

  def update(self, m) -> None:
    if not self.enabled:
      return
    done = m["round"]
    per = (time.perf_counter() - self.t0) / max(done - self.first, 1)
    left = per * (self.total - done)
    sys.stderr.write(f"\rround {done}/{self.total}  loss {m['train_loss']:.4f}  "
                     f"test acc {m['test_accuracy']:.4f}  {per:.2f} s/round  "
                     f"{_duration(left)} left   ")
    if done == self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()

  def end(self) -> None:
    if self.enabled:
      sys.stderr.write("\n")
      sys.stderr.flush()


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _initialize(args) -> bool:
  """Joins a multi-process run if asked to; True on the process that writes results."""
  from sfljax import distributed
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           auto_detect=args.distributed_auto)
  except (ValueError, RuntimeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UsageError(msg if msg.startswith(("--", "SFLJAX_"))
                     else f"--coordinator-address: {msg}") from None
  return distributed.is_main_process()


RESUME_FLAGS = ("--quiet", "--checkpoint-every", "--keep-checkpoints", "--resume")
"""The flags ``--resume`` takes: they change no number of the run."""


def _resume_config(args, argv):
  """The Config stored in the run being resumed; flags that would change it are refused."""
  from sfljax.config import Config, ConfigError
  from sfljax import rundir
  # Flags are spelled out in full (no abbreviations: allow_abbrev=False).
  given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")
           and a.split("=", 1)[0] not in RESUME_FLAGS]
  if given:
    raise UsageError(f"{given[0]}: cannot be given with --resume (the run continues with the "
                     f"settings in {os.path.join(args.resume, 'config.json')}); drop it")
  run = rundir.RunDir.resume(args.resume)
  path = run.file("config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
    cfg = Config.from_dict(stored["config"]).validate()
  except ConfigError as e:
    run.release()
    raise UsageError(f"--resume: {path}: {e.api_message}") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    run.release()
    raise UsageError(f"--resume: {path} is not a readable sfljax config "
                     f"({getattr(e, 'strerror', None) or e}); the run cannot be resumed") from None
  return cfg, run


class _Stop(Exception):
  """The run ended early with a message and an exit code (after saving what it could)."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


def _train(args, argv, startup: "_StartUp") -> int:
  from sfljax import rundir
  from sfljax.config import ConfigError
  if args.checkpoint_every < 0:
    raise UsageError(f"--checkpoint-every: must be >= 0 (0: only at the end), got "
                     f"{args.checkpoint_every}")
  if args.keep_checkpoints < 1:
    raise UsageError(f"--keep-checkpoints: must be >= 1, got {args.keep_checkpoints}")
  run = None
  try:
    if args.resume is not None:
      cfg, run = _resume_config(args, argv)
    else:
      cfg = _config(args).validate()
    writer = _initialize(args)
    if writer and run is None:
      rundir.check_new(args.out, args.overwrite)   # Before any work: nothing created yet.
    from sfljax.train import Experiment
    exp = Experiment(cfg, dataset=_load(cfg), donate=True)   # The loop owns its states.
    startup.check()   # A Ctrl-C a callback swallowed during the imports or the loading.
    if not writer:  # Other processes of a multi-host run compute; process 0 writes.
      from sfljax.train import NonFiniteError
      try:
        exp.run()
      except NonFiniteError:
        return 3      # Process 0 says why.
      return 0
    if run is None:
      run = rundir.RunDir.claim(args.out, args.overwrite)
  except ConfigError as e:
    if run is not None:
      run.release()
    raise UsageError(e.cli_message) from None
  except rundir.RunDirError as e:
    raise UsageError(str(e)) from None
  try:
    return _train_in(args, cfg, exp, run, startup)
  except KeyboardInterrupt as e:   # Before its first round: the run holds its config only.
    what = "terminated" if isinstance(e, _Terminated) else "interrupted"
    print(f"sfljax: {what} before the first round; start it again with: sfljax train "
          f"--resume {run.path}", file=sys.stderr)
    return 143 if isinstance(e, _Terminated) else 130
  finally:
    run.release()


def _train_in(args, cfg, exp, run, startup: "_StartUp") -> int:
  import jax
  from sfljax import checkpoint, rundir
  from sfljax.train import NonFiniteError, environment
  resuming = args.resume is not None
  ckpt = checkpoint.Checkpoints(run.file("checkpoints"), keep=args.keep_checkpoints)
  multi = jax.process_count() > 1   # orbax saves need every process: not checkpointed yet.
  state = exp.init()
  history = []
  try:
    if resuming:
      last = ckpt.latest()
      if last is not None:
        state = exp.restore(ckpt.directory, last)
      history = run.read_metrics(upto=state.round)
    else:
      resolved = {"cut": exp.cut, "strategy": exp.executor.name,
                  "client_sizes": [int(n) for n in exp.client_data.counts],
                  "block_names": list(exp.model.block_names),
                  "input_shape": list(exp.dataset.input_shape),
                  "num_classes": int(exp.dataset.num_classes),
                  "batch_size": int(exp.batch_size),
                  "train_samples": int(len(exp.dataset.y_train)),
                  "test_samples": int(len(exp.dataset.y_test)),
                  "steps_per_round": int(exp.steps_per_round)}
      comp = getattr(exp.algorithm, "composition", None)
      if comp is not None:
        resolved["composition"] = comp.describe()
      if exp.dp is not None:
        resolved["dp"] = exp.dp.describe()
      # exp.config: the config with what the run resolved (a calibrated --dp-noise).
      rundir.write_json(run.file("config.json"), {"config": exp.config.to_dict(),
                                                  "resolved": resolved,
                                                  "environment": environment()})
  except (rundir.RunDirError, checkpoint.CheckpointError) as e:
    raise UsageError(str(e)) from None
  except OSError as e:
    raise UsageError(f"--out: cannot write to {run.path}: {e.strerror or e}") from None
  if state.round >= cfg.rounds:
    if not os.path.exists(run.file("summary.json")):
      _write_summary(run, history, exp, "finished")
    print(f"sfljax: {run.path} already finished its {cfg.rounds} rounds; nothing to do",
          file=sys.stderr)
    return 0
  if not args.quiet:
    verb = f"resuming at round {state.round + 1}" if resuming else "training"
    print(f"sfljax: {verb} {cfg.algorithm} / {cfg.model} on {cfg.dataset} with {cfg.clients} "
          f"clients for {cfg.rounds} rounds; writing to {run.path}", file=sys.stderr)
  progress = _Progress(cfg.rounds, state.round, enabled=not args.quiet and sys.stderr.isatty())
  saved = ckpt.latest()

  def save(s):
    nonlocal saved
    if not multi and saved != s.round and s.round > 0:
      exp.save(s, ckpt.directory, keep=args.keep_checkpoints)
      saved = s.round

  status, code, message = "finished", 0, None
  tb = None
  stop = _SoftStop()
  try:
    from sfljax import tensorboard
    try:
      tb = tensorboard.ScalarLog(run.path, after_round=state.round)
    except ImportError:   # A machine without tensorboardX (e.g. an offline accelerator image).
      print("sfljax: tensorboardX is not installed: no TensorBoard files (metrics.jsonl has "
            "every round)", file=sys.stderr)
    startup.check()
    with open(run.file(rundir.METRICS), "a") as f, stop:
      exp.compile(state)
      while state.round < cfg.rounds:
        stop.check()
        try:
          state, m = exp.step(state)
        except NonFiniteError as e:
          raise _Stop(f"{e}; the run stopped: rounds 1-{e.round - 1} and the checkpoint of "
                      f"round {saved or 0} are kept in {run.path}; lower --lr, or pass "
                      "--on-nonfinite skip", 3) from None
        history.append(m)
        run.append_metrics(f, m)
        _save_inversion(run, exp, state.round)
        if tb is not None:
          tb.write(m)
        progress.update(m)
        run.started()
        every = args.checkpoint_every
        if state.round == cfg.rounds or (every and state.round % every == 0):
          save(state)
        stop.check()
  except _Stop as e:
    status, code, message = "stopped: non-finite values", e.code, str(e)
  except KeyboardInterrupt as e:
    progress.end()
    what = "terminated" if isinstance(e, _Terminated) else "interrupted"
    status, code = what, 143 if isinstance(e, _Terminated) else 130
    if stop.requested and not stop.hard:   # At a round boundary: safe to save.
      save(state)   # The last finished round: nothing is lost.
      kept = "and checkpointed"
    else:   # Stopped at once, maybe inside JAX: no save, the last checkpoint stands.
      kept = f"(the newest checkpoint is of round {saved or 0})"
    done = (f"after round {state.round}; rounds 1-{state.round} are in "
            f"{run.file(rundir.METRICS)} {kept}" if state.round
            else "before the first round finished")
    message = f"{what} {done}; continue with: sfljax train --resume {run.path}"
  except OSError as e:
    raise UsageError(f"cannot write to {run.path}: {e.strerror or e}; rounds 1-{saved or 0} "
                     f"are checkpointed: free space and continue with: sfljax train --resume "
                     f"{run.path}") from None
  finally:
    if tb is not None:
      tb.close()
  _write_summary(run, history, exp, status, message)
  if message is not None:
    print(f"sfljax: {'error: ' if code == 3 else ''}{message}", file=sys.stderr)
    return code
  if not args.quiet and history:
    best = max(history, key=lambda m: m["test_accuracy"])
    print(f"best test accuracy {best['test_accuracy']:.4f} (round {best['round']}), "
          f"final {history[-1]['test_accuracy']:.4f}; compile {exp.compile_seconds:.1f}s, "
          f"training {sum(m['seconds'] for m in history):.1f}s; results in {run.path}")
  return 0


def _save_inversion(run, exp, round_index: int) -> None:
  """The round's model-inversion grid (``--leakage``), if it ran this round:
  ``inversion_round<r>.png`` in the run folder (originals above, the server's
  reconstructions below)."""
  images = getattr(exp, "inversion_images", None)
  if images is None or images["round"] != round_index:
    return
  from sfljax.leakage import inversion
  inversion.save_grid(run.file(f"inversion_round{round_index:04d}.png"), images["originals"],
                      images["reconstructions"])


def _write_summary(run, history, exp, status, message=None) -> None:
  """summary.json: best and final accuracy over the finished (finite) rounds."""
  import math
  from sfljax import rundir
  good = [m for m in history if m.get("test_accuracy") is not None
          and math.isfinite(m["test_accuracy"])]
  best = max(good, key=lambda m: m["test_accuracy"]) if good else None
  summary = {"status": status, "rounds": len(history),
             "best_test_accuracy": best["test_accuracy"] if best else None,
             "best_round": best["round"] if best else None,
             "final_test_accuracy": good[-1]["test_accuracy"] if good else None,
             "compile_seconds": exp.compile_seconds,
             "train_seconds": sum(m["seconds"] for m in history)}
  if message is not None:
    summary["message"] = message
  used = getattr(getattr(exp, "conv_policy", None), "used", None)
  if used:   # --conv-lowering autotune: what each convolution ran as (fwd, dx, dw).
    summary["conv_lowerings"] = dict(used)
  if exp.dp is not None:
    last = history[-1] if history else {}
    summary["dp"] = {"epsilon": last.get("epsilon", 0.0), "delta": exp.dp.delta,
                     "noise_multiplier": exp.dp.noise_multiplier, "clip": exp.dp.clip,
                     "accountant": exp.dp.accountant,
                     "client_epsilon": last.get("client_epsilon"),
                     "overflow_steps": sum(m.get("dp_overflow_steps", 0) for m in history)}
  if getattr(exp, "leakage", None) is not None:   # The latest value of each measure.
    from sfljax.train import LEAKAGE_METRICS
    summary["leakage"] = {k: next((m[k] for m in reversed(history) if k in m), None)
                          for k in LEAKAGE_METRICS if k != "leakage_seconds"}
  try:
    rundir.write_json(run.file("summary.json"), summary)
  except OSError:
    pass   # The rounds and checkpoints are what count; the message says where they are.


def _report_commands() -> tuple[str, ...]:
  return ("plot", "summary")


def _report(args) -> int:
  from sfljax import report
  try:
    return report.run_command(args)
  except report.ReportError as e:
    raise UsageError(str(e)) from None


class _SoftStop:
  """While training, Ctrl-C or SIGTERM ask the run to stop after the current round
  (then the finished round is saved); a second one stops at once, without saving
  (a save after an interrupt inside JAX could wait forever on its locks)."""

  def __init__(self):
    self.requested, self.hard, self._old = None, False, {}

  def __enter__(self):
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
      if signal.getsignal(sig) is signal.SIG_IGN:
        continue   # Ignored by whoever started us (e.g. a shell's background job): so be it.
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # Not the main thread.
        pass
    return self

  def __exit__(self, *exc):
    import signal
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def _handle(self, signum, frame):
    import signal
    if self.requested is not None:
      self.hard = True
      raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    self.requested = signum
    sys.stderr.write("\nsfljax: stopping after the current round (again to stop at once)\n")
    sys.stderr.flush()

  def check(self) -> None:
    """Raises the requested stop (at a round boundary)."""
    import signal
    if self.requested is not None:
      raise _Terminated() if self.requested == signal.SIGTERM else KeyboardInterrupt()


class _Terminated(KeyboardInterrupt):
  """SIGTERM, handled like Ctrl-C."""


class _StartUp:
  """Before training, Ctrl-C and SIGTERM stop at once. An interrupt that lands while
  Python runs a callback (JAX's garbage-collection callback, during the imports) is
  swallowed by the interpreter as "unraisable"; the signal is remembered here and
  raised again by :meth:`check`, so it is never lost."""

  def __init__(self):
    self.requested, self._old, self._old_hook = None, {}, None

  def install(self) -> "_StartUp":
    import signal
    # Python would print such a swallowed interrupt as "Exception ignored in ..."; it is
    # ours, recorded, and raised again by check(): not printed.
    self._old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
    for sig in (signal.SIGINT, signal.SIGTERM):
      if signal.getsignal(sig) is signal.SIG_IGN:
        continue   # Ignored by whoever started us (e.g. a shell's background job): so be it.
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # Not the main thread (e.g. called from a worker thread).
        pass
    return self

  def restore(self) -> None:
    import signal
    for sig, old in self._old.items():
      signal.signal(sig, old)
    if self._old_hook is not None:
      sys.unraisablehook, self._old_hook = self._old_hook, None

  def _unraisable(self, info) -> None:
    if isinstance(info.exc_value, KeyboardInterrupt) and self.requested is not None:
      return   # Our own stop, raised inside a callback: check() raises it again.
    self._old_hook(info)

  def _handle(self, signum, frame):
    self.requested = signum
    self.check()

  def check(self) -> None:
    """Raises the stop asked for, if any."""
    import signal
    if self.requested is not None:
      raise _Terminated() if self.requested == signal.SIGTERM else KeyboardInterrupt()


def main(argv=None) -> int:
  startup = _StartUp().install()
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = _parser().parse_args(argv)
    if args.command in _report_commands():
      return _report(args)
    if args.command == "partition":
      return _partition(args)
    code = _train(args, argv, startup)
    if code in (130, 143):   # Interrupted: everything is written and said.
      _leave(code)
    return code
  except UsageError as e:
    print(f"sfljax: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt as e:
    what = "terminated" if isinstance(e, _Terminated) else "interrupted"
    print(f"sfljax: {what} before training started; nothing was written", file=sys.stderr)
    _leave(143 if isinstance(e, _Terminated) else 130)
  finally:
    startup.restore()   # Called in-process (tests, notebooks): the caller's handlers back.


def _leave(code: int) -> None:
  """Exits at once with ``code`` after an interrupt. Interrupted inside a heavy
  import or an XLA compilation, the interpreter's teardown of half-initialised
  extension modules can crash (SIGSEGV) or re-raise; everything is written and
  said by now, so nothing is left to tear down."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  sys.exit(main())
