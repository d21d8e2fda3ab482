"""Run reporting: a progress bar with ETA, TensorBoard + JSONL metric logs, and the end-of-run report.

- ``Progress(total_steps, desc)``: tqdm bar with ETA on a terminal; elsewhere (CI, log files) it prints
  one line every ``log_every`` steps with step, rate, elapsed time, ETA and the latest metrics.
- ``MetricWriter(workdir)``: ``scalars(step, {...})`` writes TensorBoard event files (tensorboardX) under
  ``WORKDIR/tensorboard`` and appends ``{"step", "time", ...}`` lines to ``WORKDIR/metrics.jsonl``.
  ``curves()`` gives the logged series back as ``{name: [(step, value), ...]}`` for the report.
- ``write_report(workdir, title, tables, curves, summary)``: ``WORKDIR/report.json`` (everything given)
  and ``WORKDIR/report.md`` (summary, markdown tables, PNG plots under ``WORKDIR/report_plots/``).
- ``read_event_scalars(logdir)``: reads scalars back from event files (tests and tools).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import numpy as np
import tqdm


def is_process_zero() -> bool:
  """Whether this is process 0 of a multi-host job (or the only process): the one that prints and writes logs."""
  try:
    import jax
    return jax.process_index() == 0
  except Exception:  # noqa: BLE001 (jax is optional for reporting)
    return True


def _scalar(value: Any, name: str) -> float:
  try:
    arr = np.asarray(value)
  except Exception as e:  # noqa: BLE001 (anything that is not array-like)
    raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__}") from e
  if arr.size != 1 or arr.dtype.kind not in "biuf":
    raise TypeError(f"metric {name!r}: expected a scalar number, got dtype {arr.dtype} shape {arr.shape}")
  return float(arr.reshape(()))


def _fmt(v: Any) -> str:
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    v = float(v)
    if not math.isfinite(v):
      return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
      return f"{v:.3e}"
    return f"{v:.4g}"
  return str(v)


def _fmt_seconds(s: float | None) -> str:
  if s is None or not math.isfinite(s):
    return "?"
  return tqdm.tqdm.format_interval(s)


class Progress:
  """Progress over ``total_steps`` with ETA; a tqdm bar on a tty, periodic log lines otherwise.

  Args:
    total_steps: steps of the whole run.
    desc: label shown in front of the bar / log lines.
    initial: steps already done (a resumed run), excluded from the rate.
    log_every: non-tty mode prints a line every ``log_every`` steps (default: 20 lines per run).
    stream: where to write (default stderr).
    tty: force bar (True) or log lines (False); default: whether ``stream`` is a terminal.
    enabled: show anything at all; default: only on process 0 of a multi-host job.
  """

  def __init__(self, total_steps: int, desc: str = "train", *, initial: int = 0, log_every: int | None = None,
               stream: TextIO | None = None, tty: bool | None = None, enabled: bool | None = None):
    if total_steps < 0:
      raise ValueError(f"Progress: total_steps must be >= 0, got {total_steps}")
    self.total, self.desc, self.initial = int(total_steps), desc, int(initial)
    self.stream = stream if stream is not None else sys.stderr
    self.tty = bool(tty) if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
    self.log_every = int(log_every) if log_every else max(1, self.total // 20)
    self.step = self.initial
    self.metrics: dict[str, Any] = {}
    self._t0 = time.monotonic()
    self._last_logged = self.initial
    self.enabled = is_process_zero() if enabled is None else bool(enabled)
    self._bar = tqdm.tqdm(total=self.total, initial=self.initial, desc=desc, file=self.stream,
                          dynamic_ncols=True) if self.tty and self.enabled else None

  def rate(self) -> float | None:
    """Steps per second since the start (or resume)."""
    dt = time.monotonic() - self._t0
    done = self.step - self.initial
    return done / dt if dt > 0 and done > 0 else None

  def eta_seconds(self) -> float | None:
    r = self.rate()
    return (self.total - self.step) / r if r else None

  def update(self, n: int = 1, **metrics: Any):
    """Advances by ``n`` steps; ``metrics`` are shown next to the bar / in the log line."""
    self.step += n
    if metrics:
      self.metrics.update({k: _scalar(v, k) for k, v in metrics.items()})
    if self._bar is not None:
      if metrics:
        self._bar.set_postfix({k: _fmt(v) for k, v in self.metrics.items()}, refresh=False)
      self._bar.update(n)
    elif self.step - self._last_logged >= self.log_every or self.step >= self.total:
      self._log_line()

  def set_metrics(self, **metrics: Any):
    self.metrics.update({k: _scalar(v, k) for k, v in metrics.items()})
    if self._bar is not None:
      self._bar.set_postfix({k: _fmt(v) for k, v in self.metrics.items()})

  def _log_line(self):
    self._last_logged = self.step
    if not self.enabled:
      return
    pct = 100.0 * self.step / self.total if self.total else 100.0
    rate = self.rate()
    parts = [f"{self.desc}: step {self.step}/{self.total} ({pct:.0f}%)",
             f"{rate:.3g} step/s" if rate else "? step/s",
             f"elapsed {_fmt_seconds(time.monotonic() - self._t0)}", f"ETA {_fmt_seconds(self.eta_seconds())}"]
    parts += [f"{k}={_fmt(v)}" for k, v in self.metrics.items()]
    print(" | ".join(parts), file=self.stream, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.step != self._last_logged:
      self._log_line()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc):
    self.close()


class MetricWriter:
  """Scalars to TensorBoard event files (``WORKDIR/tensorboard``) and to ``WORKDIR/metrics.jsonl``.

  Only process 0 writes (multi-host runs log once). ``resume_step``: drop JSONL lines with a larger step
  (written after the checkpoint a resumed run restarts from), so the log has one value per step.
  """

  def __init__(self, workdir: str | Path, *, resume_step: int | None = None, enabled: bool | None = None):
    self.workdir = Path(workdir)
    self.logdir = self.workdir / "tensorboard"
    self.jsonl_path = self.workdir / "metrics.jsonl"
    self.enabled = is_process_zero() if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.jsonl_path.exists():
      kept = [ln for ln in self.jsonl_path.read_text().splitlines()
              if ln.strip() and json.loads(ln).get("step", -1) <= resume_step]
      self.jsonl_path.write_text("".join(ln + "\n" for ln in kept))
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(logdir=str(self.logdir), purge_step=resume_step + 1 if resume_step is not None else None)
    self._jsonl = open(self.jsonl_path, "a", buffering=1)

  def scalars(self, step: int, metrics: Mapping[str, Any]):
    """Writes one value per metric at ``step``; values may be Python/numpy/jax scalars."""
    if not self.enabled:
      return
    values = {str(k): _scalar(v, k) for k, v in metrics.items()}
    for k, v in values.items():
      self._tb.add_scalar(k, v, global_step=int(step))
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update(values)
    self._jsonl.write(json.dumps(record) + "\n")

  def flush(self):
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = self._jsonl = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc):
    self.close()

  def curves(self) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric as ``[(step, value), ...]`` read from ``metrics.jsonl``."""
    return read_metrics_jsonl(self.jsonl_path)


def read_metrics_jsonl(path: str | Path) -> dict[str, list[tuple[int, float]]]:
  path = Path(path)
  out: dict[str, list[tuple[int, float]]] = {}
  if not path.exists():
    return out
  for lineno, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from e
    step = rec.get("step")
    for k, v in rec.items():
      if k not in ("step", "time"):
        out.setdefault(k, []).append((int(step), float(v)))
  return out


def read_event_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
  """Scalars from the TensorBoard event files in ``logdir`` (record framing + ``tensorboardX.proto``)."""
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  files = sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"{logdir}: no events.out.tfevents.* files")
  for path in files:
    data = Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      start = pos + 12  # uint64 length, uint32 masked crc of the length
      if start + length + 4 > len(data):
        raise ValueError(f"{path}: truncated record at byte {pos}")
      event = event_pb2.Event()
      event.ParseFromString(data[start:start + length])
      pos = start + length + 4  # record, uint32 masked crc of the record
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
  return out


# ----------------------------------------------------------------------------------------------------
# End-of-run report.


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "curve"


def _jsonable(obj: Any, where: str) -> Any:
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj)
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if hasattr(obj, "shape") and hasattr(obj, "dtype"):
    arr = np.asarray(obj)
    return arr.item() if arr.size == 1 else arr.tolist()
  raise TypeError(f"write_report: {where} is a {type(obj).__name__}, which cannot go into report.json")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table whose columns are the union of the rows' keys, in first-seen order."""
  if not rows:
    return "_(no rows)_\n"
  cols: list[str] = []
  for row in rows:
    cols += [str(k) for k in row if str(k) not in cols]
  esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for row in rows:
    r = {str(k): v for k, v in row.items()}
    lines.append("| " + " | ".join(esc(_fmt(r[c])) if c in r else "" for c in cols) + " |")
  return "\n".join(lines) + "\n"


def _plot_curve(name: str, points: Sequence[tuple[int, float]], path: Path):
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  steps = [p[0] for p in points]
  values = [p[1] for p in points]
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
  try:
    ax.plot(steps, values, marker="o" if len(points) < 30 else None, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
  finally:
    plt.close(fig)


def write_report(workdir: str | Path, title: str, tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
                 summary: Mapping[str, Any] | None = None, enabled: bool | None = None) -> dict[str, Path]:
  """Writes ``WORKDIR/report.json`` and ``WORKDIR/report.md`` (+ one PNG per curve); returns their paths.

  Args:
    tables: {table name: [row dict, ...]}, e.g. per-embodiment success and return.
    curves: {curve name: [(step, value), ...]}, e.g. ``MetricWriter.curves()``.
    summary: flat facts about the run (steps, wall time, final loss, ...).
    enabled: write at all; default: only process 0 of a multi-host job writes (the others, whose metric writers are
      off, return the paths process 0 writes).
  """
  workdir = Path(workdir)
  if not (is_process_zero() if enabled is None else enabled):
    return {"json": workdir / "report.json", "md": workdir / "report.md"}
  workdir.mkdir(parents=True, exist_ok=True)
  tables = {str(k): [dict(r) for r in v] for k, v in (tables or {}).items()}
  summary = dict(summary or {})
  clean_curves: dict[str, list[tuple[int, float]]] = {}
  for name, pts in (curves or {}).items():
    try:
      clean_curves[str(name)] = [(int(s), float(v)) for s, v in pts]
    except (TypeError, ValueError) as e:
      raise ValueError(f"write_report: curve {name!r} must be a list of (step, value) pairs ({e})") from e

  report = {"title": title, "summary": _jsonable(summary, "summary"), "tables": _jsonable(tables, "tables"),
            "curves": {k: [[s, v] for s, v in pts] for k, pts in clean_curves.items()}}
  json_path = workdir / "report.json"
  json_path.write_text(json.dumps(report, indent=2) + "\n")

  plot_dir = workdir / "report_plots"
  md = [f"# {title}\n"]
  if summary:
    md += ["## Summary\n", markdown_table([{"key": k, "value": v} for k, v in summary.items()])]
  for name, rows in tables.items():
    md += [f"## {name}\n", markdown_table(rows)]
  plots: dict[str, Path] = {}
  if clean_curves:
    md.append("## Curves\n")
    plot_dir.mkdir(exist_ok=True)
    used: set[str] = set()
    for name, pts in clean_curves.items():
      if not pts:
        md.append(f"_{name}: no points_\n")
        continue
      slug = _slug(name)
      while slug in used:
        slug += "_"
      used.add(slug)
      png = plot_dir / f"{slug}.png"
      _plot_curve(name, pts, png)
      plots[name] = png
      md.append(f"![{name}](report_plots/{png.name})\n")
  md_path = workdir / "report.md"
  md_path.write_text("\n".join(md))
  return {"json": json_path, "md": md_path, **{f"plot:{k}": v for k, v in plots.items()}}
