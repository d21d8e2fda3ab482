"""The one entry point: ``python -m gea_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.a.b=v]``.

The config's ``trainer`` field names a module ``gea_jax.train.<trainer>`` that provides
``validate(config)`` and ``run(config, workdir)``. The config is validated (unknown keys, wrong
types, impossible values: one clear line naming the key) before anything is compiled.

Multi-host jobs run the same command on every host with ``--distributed=auto`` (Cloud TPU pod slices), or with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (gea_jax/distributed.py).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gea_jax import distributed
from gea_jax.config_validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_DISTRIBUTED = flags.DEFINE_string("distributed", "none", "'auto': join a multi-host job whose processes JAX finds "
                                   "itself (Cloud TPU pod slices, SLURM, Kubernetes); 'none': one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-host job without auto-detection: HOST:PORT of "
                                   "process 0's coordinator (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host job: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host job: this process's id in [0, num_processes).")

TRAINERS = {
    "tokenizer": "gea_jax.train.tokenizer",
    "sft": "gea_jax.train.sft",
    "ppo_mlp": "gea_jax.train.ppo_mlp",
    "ppo": "gea_jax.train.ppo",
    "pipeline": "gea_jax.train.pipeline",
}


def _fail(message: str) -> None:
  print(f"gea_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad override into one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # unknown --config.a.b key
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    bad = next((a for a in argv if a.startswith("--config.")), "")
    _fail(f"unknown config key in {bad.split('=')[0]}: {msg}")
  except (ValueError, TypeError) as e:
    _fail(f"bad config override: {e}")
  raise AssertionError("unreachable")  # _fail exits


def trainer_module(config):
  name = getattr(config, "trainer", None)
  if name not in TRAINERS:
    raise ConfigError(f"trainer: must be one of {sorted(TRAINERS)}, got {name!r}")
  return importlib.import_module(TRAINERS[name])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    _fail("--config is required (e.g. --config=configs/default.py)")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  config = _CONFIG.value
  try:  # before validation, which counts the devices of all processes
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except distributed.DistributedError as e:
    _fail(str(e))
  distributed.watch_peers()  # a multi-process job: another process's failure stops this one at once
  try:
    module = trainer_module(config)
    module.validate(config)
  except ConfigError as e:
    _fail(f"config: {e}")
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(workdir, exist_ok=True)
  logging.info("trainer=%s workdir=%s", config.trainer, workdir)
  distributed.run_or_stop_all(module.run, config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
