"""Tests for gea_jax.reporting: progress lines, TensorBoard/JSONL metrics, the end-of-run report."""

import io
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from gea_jax import reporting


def test_progress_non_tty_prints_periodic_lines_with_eta():
  out = io.StringIO()
  with reporting.Progress(10, "sft", log_every=4, stream=out, tty=False) as p:
    for i in range(10):
      p.update(1, loss=1.0 / (i + 1))
  lines = out.getvalue().strip().splitlines()
  steps = [int(re.search(r"step (\d+)/10", ln).group(1)) for ln in lines]
  assert steps == [4, 8, 10]
  assert all("ETA" in ln and "elapsed" in ln for ln in lines)
  assert "loss=0.1" in lines[-1]
  assert "(100%)" in lines[-1]


def test_progress_resumed_counts_from_initial_and_tty_bar():
  out = io.StringIO()
  p = reporting.Progress(8, "ppo", initial=5, stream=out, tty=True)
  p.update(3, reward=2.5)
  p.close()
  text = out.getvalue()
  assert "ppo" in text and "8/8" in text and "reward=2.5" in text


def test_progress_rejects_non_scalar_metric():
  p = reporting.Progress(4, "x", stream=io.StringIO(), tty=False)
  with pytest.raises(TypeError, match="metric 'loss'"):
    p.update(1, loss=np.ones(3))


def test_metric_writer_event_files_and_jsonl(tmp_path):
  with reporting.MetricWriter(tmp_path) as w:
    for step in range(1, 6):
      w.scalars(step, {"train/loss": jnp.float32(1.0 / step), "lr": 1e-3 * step})
  events = reporting.read_event_scalars(tmp_path / "tensorboard")
  assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in events["train/loss"]], [1.0 / s for s in range(1, 6)], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in events["lr"]], [1e-3 * s for s in range(1, 6)], rtol=1e-6)
  curves = reporting.read_metrics_jsonl(tmp_path / "metrics.jsonl")
  assert curves["lr"][2] == (3, pytest.approx(3e-3))
  assert len(curves["train/loss"]) == 5


def test_metric_writer_resume_drops_steps_after_checkpoint(tmp_path):
  with reporting.MetricWriter(tmp_path) as w:
    for step in range(1, 8):
      w.scalars(step, {"loss": float(step)})
  # the run is resumed from a checkpoint at step 4: steps 5..7 are logged again
  with reporting.MetricWriter(tmp_path, resume_step=4) as w:
    for step in range(5, 9):
      w.scalars(step, {"loss": 10.0 * step})
    curves = w.curves()
  assert curves["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)]


def test_write_report_files(tmp_path):
  tables = {"per embodiment": [{"embodiment": "reacher", "success": 0.85, "return": 12.5},
                               {"embodiment": "grid|nav", "success": 0.9, "expert_success": 1.0}]}
  curves = {"train/loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "eval/success": [(2, 0.3), (4, 0.8)]}
  summary = {"steps": 4, "wall_time_s": 12.25, "final_loss": np.float32(1.2)}
  paths = reporting.write_report(tmp_path, "Tiny SFT run", tables, curves, summary)

  report = json.loads((tmp_path / "report.json").read_text())
  assert report["title"] == "Tiny SFT run"
  assert report["tables"] == {"per embodiment": tables["per embodiment"]}
  assert report["curves"]["eval/success"] == [[2, 0.3], [4, 0.8]]
  assert report["summary"]["steps"] == 4 and report["summary"]["final_loss"] == pytest.approx(1.2)

  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# Tiny SFT run")
  assert "| embodiment | success | return | expert_success |" in md
  assert "| reacher | 0.85 | 12.5 |  |" in md
  assert "| grid\\|nav | 0.9 |  | 1 |" in md
  assert "| wall_time_s | 12.25 |" in md
  for name in curves:
    png = paths[f"plot:{name}"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![{name}](report_plots/{png.name})" in md
  assert paths["plot:train/loss"].name != paths["plot:eval/success"].name


def test_write_report_rejects_bad_curve(tmp_path):
  with pytest.raises(ValueError, match="curve 'loss'"):
    reporting.write_report(tmp_path, "x", curves={"loss": [1.0, 2.0]})
