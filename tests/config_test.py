"""The Config schema: one source for the dataclass, the CLI flags, the docs and JSON."""

import dataclasses
import glob
import json
import os
import pickle
import pydoc
import subprocess
import sys

import pytest

from sfljax import cli, config
from sfljax.config import Config, ConfigError

TABLE5 = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                       "configs", "table5", "*.json")))


def _parse(argv):
  return cli._config(cli._parser().parse_args(argv))


def _train_flags():
  """{flag: argparse action} of ``sfljax train``."""
  sub = next(a for a in cli._parser()._actions if a.dest == "command")
  return {s: a for a in sub.choices["train"]._actions for s in a.option_strings}


def test_every_field_has_help_and_a_flag():
  flags = _train_flags()
  seen = set()
  for f in dataclasses.fields(Config):
    assert f.metadata["help"].strip(), f.name
    if f.metadata.get("cli", True) is False:
      continue
    flag = config.flag(f.name)
    assert flag not in seen
    seen.add(flag)
    assert flags[flag].dest == f.name, f.name
    assert flags[flag].choices == f.metadata.get("choices"), f.name
  assert config.flag("lr") == "--lr" and config.flag("augment") == "--no-augment"
  assert config.flag("client_fraction") == "--client-fraction"
  assert {"--out", "--overwrite", "--quiet", "--coordinator-address", "--num-processes",
          "--process-id", "--distributed-auto"} <= set(flags)


def test_new_fields_and_choices():
  cfg = Config()
  assert (cfg.algorithm, cfg.cut, cfg.optimizer, cfg.client_optimizer, cfg.server_optimizer,
          cfg.momentum, cfg.weight_decay, cfg.lr_schedule, cfg.loss, cfg.label_smoothing,
          cfg.dropout) == ("sflv1", None, "adam", None, None, 0.0, 0.0, "constant",
                           "cross_entropy", 0.0, 0.0)
  choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(Config)}
  assert choices["algorithm"] == ("centralized", "fl", "sl", "sflv1", "sflv2", "sflv3")
  for name in ("optimizer", "client_optimizer", "server_optimizer"):
    assert choices[name] == ("adam", "adamw", "sgd")
  assert choices["lr_schedule"] == ("constant", "cosine", "step")
  assert choices["loss"] == ("cross_entropy",)


def test_defaults_parse_to_the_default_config():
  assert _parse(["train"]) == Config()
  assert _parse(["partition"]) == Config()


def test_every_flag_parses_to_the_constructed_config():
  argv = ["train", "--algorithm", "sflv2", "--model", "alexnet", "--cut", "conv1, fc2",
          "--norm", "group", "--dropout", "0.25", "--conv-lowering", "autotune",
          "--dataset", "mnist", "--data-dir", "/d", "--clients", "7", "--rounds", "3", "--local-epochs", "2", "--batch-size", "16",
          "--optimizer", "sgd", "--client-optimizer", "adamw", "--server-optimizer", "adam",
          "--lr", "0.05", "--lr-schedule", "cosine", "--momentum", "0.9",
          "--weight-decay", "1e-4", "--loss", "cross_entropy", "--label-smoothing", "0.1",
          "--optimizer-state", "reference", "--sflv2-order", "client",
          "--partition", "dirichlet", "--alpha", "0.3", "--shards-per-client", "3",
          "--classes-per-client", "4", "--min-client-size", "5", "--seed", "11",
          "--no-augment", "--strategy", "sequential", "--step-loop", "python",
          "--eval-batch-size", "64", "--client-fraction", "0.5", "--client-block", "2",
          "--precision", "bf16", "--devices", "1", "--client-aggregation", "none",
          "--server-side", "shared", "--schedule", "client_major", "--dropout-rate", "0.2",
          "--dropout-point", "before_upload", "--on-nonfinite", "skip", "--out", "/tmp/x",
          "--dp-clip", "0.5", "--dp-noise", "1.3", "--dp-epsilon", "2", "--dp-delta", "1e-6",
          "--dp-accountant", "pld", "--pixeldp-epsilon", "2", "--pixeldp-layer", "conv1",
          "--pixeldp-mechanism", "gaussian", "--pixeldp-delta", "1e-5", "--pixeldp-draws", "8",
          "--leakage", "--leakage-holdout", "0.2", "--leakage-aux", "300", "--leakage-probe",
          "100", "--leakage-inversion-every", "2", "--leakage-decoder-steps", "50",
          "--nopeek-weight", "0.5", "--quiet"]
  want = Config(algorithm="sflv2", model="alexnet", cut="conv1,fc2", norm="group", dropout=0.25,
                conv_lowering="autotune", dataset="mnist", data_dir="/d", clients=7, rounds=3, local_epochs=2,
                batch_size=16, optimizer="sgd", client_optimizer="adamw",
                server_optimizer="adam", lr=0.05, lr_schedule="cosine", momentum=0.9,
                weight_decay=1e-4, loss="cross_entropy", label_smoothing=0.1,
                optimizer_state="reference", sflv2_order="client", partition="dirichlet",
                alpha=0.3, shards_per_client=3, classes_per_client=4, min_client_size=5,
                seed=11, augment=False, strategy="sequential", step_loop="python",
                eval_batch_size=64, client_fraction=0.5, client_block=2, precision="bf16",
                devices=1, client_aggregation="none", server_side="shared",
                schedule="client_major", dropout_rate=0.2, dropout_point="before_upload",
                on_nonfinite="skip", dp_clip=0.5, dp_noise=1.3, dp_epsilon=2.0, dp_delta=1e-6,
                dp_accountant="pld", pixeldp_epsilon=2.0, pixeldp_layer="conv1",
                pixeldp_mechanism="gaussian", pixeldp_delta=1e-5, pixeldp_draws=8,
                leakage=True, leakage_holdout=0.2, leakage_aux=300, leakage_probe=100,
                leakage_inversion_every=2, leakage_decoder_steps=50, nopeek_weight=0.5)
  assert _parse(argv) == want
  default = Config()
  untouched = [f.name for f in dataclasses.fields(Config) if f.metadata.get("cli", True)
               and f.name != "loss" and getattr(want, f.name) == getattr(default, f.name)]
  assert untouched == []                 # every flag is exercised (loss has one choice)


def test_partition_command_shares_the_generated_options():
  flags = {s for s in _train_flags()}
  args = cli._parser().parse_args(["partition", "--clients", "4", "--partition", "classes",
                                   "--classes-per-client", "3", "--seed", "2", "--alpha", "1",
                                   "--shards-per-client", "5", "--min-client-size", "2",
                                   "--dataset", "digits", "--data-dir", "/d"])
  assert cli._config(args) == Config(clients=4, partition="classes", classes_per_client=3,
                                     seed=2, alpha=1.0, shards_per_client=5, min_client_size=2,
                                     data_dir="/d")
  assert {config.flag(n) for n in cli.PARTITION_FIELDS} <= flags
  with pytest.raises(cli.UsageError, match="--lr"):
    cli._parser().parse_args(["partition", "--lr", "0.1"])


@pytest.mark.parametrize("text,value", [
    ("2", 2), (" 12 ", 12), ("conv2", "conv2"), (" conv2 ", "conv2"), ("1,4", "1,4"),
    ("1, 4", "1,4"), ("conv1 ,fc2", "conv1,fc2"), ("-1", "-1"), ("3,2", "3,2")])
def test_cut_text(text, value):
  assert config.parse_cut(text) == value and type(config.parse_cut(text)) is type(value)
  assert _parse(["train", "--cut", text]).cut == value


def test_cut_spellings_are_one_config():
  assert Config(cut="2") == Config(cut=2) == _parse(["train", "--cut", "2"])
  assert Config(cut=(1, 4)) == Config(cut=[1, 4]) == Config(cut="1,4")
  assert Config(cut=["conv1", "fc2"]).cut == "conv1,fc2"
  for cut in (2, "conv2", "1,4", "conv1,fc2", "1,fc2"):
    assert Config(cut=cut).validate().cut == cut


@pytest.mark.parametrize("path", TABLE5, ids=os.path.basename)
def test_table5_configs_load_and_validate(path):
  with open(path) as f:
    spec = json.load(f)
  cfg = Config.from_dict(spec["config"]).validate()
  for key, value in spec["config"].items():
    assert getattr(cfg, key) == value
  for scheme in spec["schemes"]:
    dataclasses.replace(cfg, algorithm=scheme).validate()


def test_dict_round_trip():
  cfg = Config(algorithm="sl", cut="conv1,fc2", optimizer="adamw", weight_decay=0.01,
               lr_schedule="step", augment=False)
  assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert Config.from_dict({}) == Config()


BAD = [
    (dict(cut="3,2"), "cut", "cuts must increase, got 3,2"),
    (dict(cut="2,2"), "cut", "cuts must increase"),
    (dict(cut="1,2,3"), "cut", "at most two cuts"),
    (dict(cut=""), "cut", "empty cut"),
    (dict(cut="1,"), "cut", "empty cut"),
    (dict(cut=0), "cut", "positive"),
    (dict(cut="0,3"), "cut", "positive"),
    (dict(cut="-1"), "cut", "positive"),
    (dict(cut=2.5), "cut", "must be an int"),
    (dict(algorithm="fl", cut=2), "cut", "fl has no cut"),
    (dict(algorithm="centralized", cut="conv2"), "cut", "centralized has no cut"),
    (dict(algorithm="sflv4"), "algorithm", "choose one of"),
    (dict(optimizer="lamb"), "optimizer", "adam, adamw, sgd"),
    (dict(client_optimizer="lamb"), "client_optimizer", "choose one of"),
    (dict(server_optimizer="rmsprop"), "server_optimizer", "choose one of"),
    (dict(lr_schedule="linear"), "lr_schedule", "constant, cosine, step"),
    (dict(loss="mse"), "loss", "cross_entropy"),
    (dict(momentum=0.5), "momentum", "only sgd"),
    (dict(momentum=0.5, optimizer="adamw"), "momentum", "only sgd"),
    (dict(momentum=0.5, optimizer="sgd", server_optimizer="adam"), "momentum",
     "server optimizer is adam (--server-optimizer)"),
    (dict(momentum=1.0, optimizer="sgd"), "momentum", "[0, 1)"),
    (dict(momentum=-0.1, optimizer="sgd"), "momentum", "[0, 1)"),
    (dict(weight_decay=-1e-4), "weight_decay", ">= 0"),
    (dict(weight_decay=float("nan")), "weight_decay", ">= 0"),
    (dict(label_smoothing=1.5), "label_smoothing", "[0, 1)"),
    (dict(label_smoothing=1.0), "label_smoothing", "[0, 1)"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(dropout=-0.5), "dropout", "[0, 1)"),
    (dict(lr=0), "lr", "positive"),
    (dict(lr="0.1"), "lr", "positive"),
    (dict(clients=0), "clients", "positive integer"),
    (dict(batch_size=2.0), "batch_size", "positive integer"),
    (dict(client_block=0), "client_block", "positive integer"),
    (dict(client_fraction=1.5), "client_fraction", "(0, 1]"),
    (dict(algorithm="centralized", client_fraction=0.5), "client_fraction", "one client"),
    (dict(augment="no"), "augment", "True or False"),
    (dict(norm="layer"), "norm", "choose one of"),
]


@pytest.mark.parametrize("kwargs,field,needle", BAD)
def test_validation_names_field_and_flag(kwargs, field, needle):
  with pytest.raises(ConfigError) as info:
    Config(**kwargs).validate()
  e = info.value
  assert e.field == field and e.flag == config.flag(field)
  assert str(e).startswith(f"{field} ({e.flag}): ") and needle in str(e)
  assert e.cli_message == f"{e.flag}: {e.message}"
  assert e.api_message == f"{field}: {e.message}"


def test_augment_error_names_the_negated_flag():
  with pytest.raises(ConfigError) as info:
    Config(augment=1).validate()
  assert info.value.flag == "--no-augment" and info.value.field == "augment"


def test_momentum_with_sgd_on_every_side_is_fine():
  Config(optimizer="sgd", momentum=0.9).validate()
  Config(optimizer="adam", client_optimizer="sgd", server_optimizer="sgd",
         momentum=0.9).validate()


def test_from_dict_unknown_key():
  with pytest.raises(ConfigError) as info:
    Config.from_dict({"clients": 3, "learning_rate": 0.1})
  e = info.value
  assert e.field == "learning_rate" and e.flag == "--learning-rate"
  assert "unknown setting 'learning_rate'" in str(e) and "lr" in str(e)
  with pytest.raises(TypeError):
    Config.from_dict([("clients", 3)])


def test_config_error_both_spellings():
  a, b = ConfigError("--lr", "bad"), ConfigError("lr", "bad")
  for e in (a, b):
    assert (str(e), e.flag, e.field, e.api_message, e.cli_message) == (
        "lr (--lr): bad", "--lr", "lr", "lr: bad", "--lr: bad")
  e = ConfigError("--coordinator-address", "unreachable")     # CLI-only: no field
  assert e.field is None and e.api_message == str(e)
  assert ConfigError("--no-augment", "x").field == "augment"
  c = pickle.loads(pickle.dumps(a))
  assert type(c) is ConfigError and (str(c), c.field) == ("lr (--lr): bad", "lr")
  assert isinstance(a, ValueError)


def test_help_documents_every_field():
  doc = pydoc.render_doc(Config, renderer=pydoc.plaintext)
  for f in dataclasses.fields(Config):
    assert f"{f.name}: " in doc and f"= {f.default!r}" in doc, f.name
    assert config.flag(f.name) in doc
    for choice in f.metadata.get("choices") or ():
      assert choice in Config.__doc__
  assert "one of centralized, fl, sl, sflv1, sflv2, sflv3" in Config.__doc__


@pytest.mark.parametrize("argv,flag", [
    (["--cut", "3,2"], "--cut"), (["--momentum", "0.5", "--optimizer", "adam"], "--momentum"),
    (["--label-smoothing", "1.5"], "--label-smoothing"), (["--algorithm", "fl", "--cut", "2"],
                                                         "--cut"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--dropout", "1"], "--dropout")])
def test_cli_reports_validation_errors(argv, flag, capsys, tmp_path):
  out = tmp_path / "never"
  assert cli.main(["train", "--quiet", "--out", str(out)] + argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"sfljax: error: {flag}: ") and err.count("\n") == 1
  assert not out.exists()


def test_cli_process_bad_cut_one_line_exit_2(tmp_path):
  out = tmp_path / "never"
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--cut", "3,2",
                         "--out", str(out)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr == "sfljax: error: --cut: cuts must increase, got 3,2\n"
  assert proc.stdout == "" and not out.exists()
