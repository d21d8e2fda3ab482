"""The one entry point: a bad config is one clear line naming the key, before anything compiles."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(tmp_path, *overrides, config="configs/default.py"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "gea_jax.main", f"--config={config}", f"--workdir={tmp_path}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("--config.model.llm.num_hedas=3", "unknown config key in --config.model.llm.num_hedas"),
    ("--config.model.llm.num_heads=abc", "--config.model.llm.num_heads=abc"),
    ("--config.model.llm.num_heads=5", "model.llm.num_heads: must divide model.llm.hidden_size=128, got 5"),
    ("--config.model.lora.rank=0", "model.lora.rank: must be > 0, got 0"),
    ("--config.mesh.shape=(3,1,1)", "mesh.shape"),
])
def test_bad_config_is_one_line(tmp_path, override, expected):
  extra = ["--config.model.train_mode=lora"] if "lora" in override else []
  proc = run_main(tmp_path, override, *extra)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("gea_jax: error:")]
  assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)  # nothing was written before the config was rejected


def test_every_trainer_module_exists_with_validate_and_run():
  """`gea_jax.main.TRAINERS` names only modules that exist and provide what main calls."""
  import importlib

  from gea_jax.main import TRAINERS
  assert {"pipeline", "tokenizer", "sft", "ppo", "ppo_mlp"} <= set(TRAINERS)
  for name, module in TRAINERS.items():
    mod = importlib.import_module(module)
    assert callable(getattr(mod, "validate", None)) and callable(getattr(mod, "run", None)), name
