"""The compile-only TPU check (gea_jax.tools.aot_compile) on a v5e topology, with the libtpu `make install` puts in
.venv/tpu. Each case runs the tool in its own process: jax looks for the TPU library only when it first starts its
backends, which the test process has done already (8 fake CPU devices). The first test runs two checks at once, as
pytest's workers may (libtpu's per-process lock file is waived by the tool)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(sys.prefix, "tpu", "libtpu", "libtpu.so")

pytestmark = pytest.mark.skipif(not os.path.exists(LIBTPU) and "TPU_LIBRARY_PATH" not in os.environ,
                                reason=f"no libtpu at {LIBTPU} (make install puts it there)")


def run_tool(*flags: str) -> tuple[int, dict | None, str]:
  proc = subprocess.run([sys.executable, "-m", "gea_jax.tools.aot_compile", "--config=configs/default.py", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  lines = proc.stdout.strip().splitlines()
  report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
  return proc.returncode, report, proc.stderr


def test_sft_step_compiles_for_a_v5e_pod_fsdp_splits_the_state_and_a_step_too_big_is_named():
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    # the "data" mesh's check also runs with a budget of 0.001 of the chip (16 MiB), which the default's step (~0.1
    # GiB) exceeds: the same compiled step is reported, as not fitting (XLA:TPU's own out-of-HBM refusal, exit 1
    # as well, takes minutes to reach with a program that big)
    runs = [pool.submit(run_tool, "--topology=v5e:2x2", "--config.mesh.shape=-1,1,1", "--max_hbm_fraction=0.001"),
            pool.submit(run_tool, "--topology=v5e:2x2", "--config.mesh.shape=1,-1,1")]
    (code_d, data, err_d), (code_f, fsdp, err_f) = [r.result() for r in runs]
  assert code_d == 1, err_d[-3000:]
  assert data["fits"] is False and data["max_hbm_fraction"] == 0.001
  assert data["bytes_per_chip"] > 0.001 * data["hbm_bytes_per_chip"]
  assert "does not fit a v5e:2x2 chip" in err_d and "sft.batch_size" in err_d and "mesh.shape" in err_d
  assert code_f == 0, err_f[-3000:]
  assert fsdp["fits"] is True
  for r in (data, fsdp):
    assert r["chips"] == 4 and r["device_kind"].startswith("TPU v5")
    assert r["hbm_bytes_per_chip"] == 16 << 30 and 0 < r["bytes_per_chip"] < r["hbm_bytes_per_chip"]
    assert r["flops_per_chip"] > 0
    # the step donates the model + optimizer state: its outputs reuse the argument buffers
    assert r["alias_bytes"] > 0.9 * r["output_bytes"]
  assert data["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  # replicated over "data", the parameters and Adam moments are whole on every chip; over "fsdp", a quarter of them
  assert fsdp["argument_bytes"] < 0.4 * data["argument_bytes"]
  # the same global batch: FLOPs split over 4 chips either way
  assert fsdp["flops_per_chip"] == pytest.approx(data["flops_per_chip"], rel=0.5)


@pytest.mark.parametrize("flag, message", [
    ("--topology=v9:2x2", "--topology='v9:2x2': unknown TPU generation 'v9'"),
    ("--config.data.embodiments=reacher,nosuch", "data.embodiments: unknown embodiment"),
    # 4 chips of v5e:2x2 on the "data" axis: the batch must split over them (checked against the topology, not
    # against this process's devices)
    ("--config.sft.batch_size=30", "sft.batch_size: must be divisible by the data*fsdp mesh size 4"),
])
def test_bad_input_is_one_clear_error(flag, message):
  code, report, err = run_tool("--topology=v5e:2x2", flag)
  assert code == 2 and report is None, err[-3000:]
  assert f"aot_compile: {message}" in err


def test_ppo_collectors_and_update_compile_for_a_v5e_pod():
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    # one body's collector (reacher, the one with several action tokens) keeps the compile short
    runs = [pool.submit(run_tool, "--topology=v5e:2x2", "--stage=ppo", "--config.ppo.embodiments=reacher"),
            # 8 envs split over the 4 chips of the "data" axis: 6 do not (checked against the topology's chips)
            pool.submit(run_tool, "--topology=v5e:2x2", "--stage=ppo", "--config.ppo.num_envs=6")]
    (code, report, err), (bad_code, bad_report, bad_err) = [r.result() for r in runs]
  assert code == 0, err[-3000:]
  assert report["stage"] == "ppo" and report["chips"] == 4 and report["fits"] is True
  bodies = report["programs"].keys() - {"update"}
  assert sorted(report["programs"]) == ["collect/reacher", "update"]
  for r in report["programs"].values():
    assert 0 < r["bytes_per_chip"] < report["hbm_bytes_per_chip"] and r["flops_per_chip"] > 0
    # the collector scans over the env steps, the update over epochs and minibatches: their FLOPs count every pass,
    # where XLA's own count has each loop body once
    assert r["flops_per_chip"] > 1.5 * r["xla_flops_bodies_once"]
  # the update re-scores whole sequences with gradients for several epochs: the largest program and most FLOPs
  assert report["largest"] == "update" and report["bytes_per_chip"] == report["programs"]["update"]["bytes_per_chip"]
  assert all(report["programs"]["update"]["flops_per_chip"] > report["programs"][b]["flops_per_chip"] for b in bodies)
  # the update donates the parameters and Adam state: its outputs (those, and a few metrics) reuse their buffers
  update = report["programs"]["update"]
  assert update["alias_bytes"] > 0.9 * update["output_bytes"]
  assert bad_code == 2 and bad_report is None, bad_err[-3000:]
  assert "aot_compile: ppo.num_envs: must be divisible by the data*fsdp mesh size 4" in bad_err
