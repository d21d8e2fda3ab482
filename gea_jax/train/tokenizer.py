"""Stage 0 trainer: fits the multi-embodiment RVQ action tokenizer and writes its artifact.

    python -m gea_jax.main --config=configs/rvq.py --workdir=DIR

Data is any *array source*: ``{embodiment name: (EmbodimentSpec, actions)}`` with actions ``[N, da]``
(consecutive steps of one stream; chunks of ``H`` are windows over it) or ``[N, H, da]`` (already
chunked), optionally with dataset normalization statistics (``ActionSource``). The config picks one:
``data.source = "tfds"`` (the episode datasets under ``data.data_dir``, with the normalization
statistics saved beside them) or ``"experts"`` (fresh rollouts of ``data_pipelines.experts``).

Batches mix the continuous embodiments with equal weight. Each step: gradient step on the networks
(reconstruction + commitment), then the EMA codebook update with dead-code restart, all in one jitted
function over the global batch sharded on the mesh. Logged: loss, per-embodiment normalized
reconstruction error, codebook usage and perplexity per level, restarted codes. At the end: per-embodiment
NMSE through the real path (vocab encode -> decode, de-normalized and clipped), ``WORKDIR/artifact``
(``load_artifact``), TensorBoard events, ``metrics.jsonl`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gea_jax import sharding
from gea_jax.config_validation import ConfigError, check_mesh, check_type, get, one_of, positive, require
from gea_jax.envs.spec import EmbodimentSpec
from gea_jax.tokenizers.action_vocab import MODES, ActionVocab, build_vocab
from gea_jax.tokenizers.artifact import save_artifact
from gea_jax.tokenizers.rvq import ActionTokenizer, RVQConfig, max_action_dim, pad_actions

logger = logging.getLogger(__name__)

SOURCES = ("tfds", "experts")


# ----------------------------------------------------------------------------------------------------
# Array sources.


@dataclasses.dataclass
class ActionSource:
  """One embodiment's actions: ``[N, da]`` (a stream) or ``[N, H, da]`` (chunks); optional stats."""

  spec: EmbodimentSpec
  actions: np.ndarray
  mean: np.ndarray | None = None
  std: np.ndarray | None = None
  episode_starts: np.ndarray | None = None  # [N] bool for [N, da] streams: chunks never cross these

  def __post_init__(self):
    self.actions = np.asarray(self.actions, np.float32)
    name = self.spec.name
    if not self.spec.action_space.is_continuous:
      raise ValueError(f"source {name!r}: discrete embodiments need no tokenizer training (they get reserved ids)")
    d = self.spec.action_space.dim
    if self.actions.ndim not in (2, 3) or self.actions.shape[-1] != d:
      raise ValueError(f"source {name!r}: actions must be [N, {d}] or [N, H, {d}], got {self.actions.shape}")
    if self.actions.shape[0] == 0:
      raise ValueError(f"source {name!r}: no actions")
    if not np.all(np.isfinite(self.actions)):
      raise ValueError(f"source {name!r}: actions contain NaN or inf")

  def chunks(self, chunk_len: int) -> np.ndarray:
    """[M, H, da] chunks (windows within episodes for a stream)."""
    a = self.actions
    if a.ndim == 3:
      if a.shape[1] != chunk_len:
        raise ValueError(f"source {self.spec.name!r}: chunks have length {a.shape[1]}, rvq.chunk_len is {chunk_len}")
      return a
    if chunk_len == 1:
      return a[:, None]
    starts = np.zeros(len(a), bool) if self.episode_starts is None else np.asarray(self.episode_starts, bool)
    episode = np.cumsum(starts)
    idx = np.arange(len(a) - chunk_len + 1)
    ok = episode[idx] == episode[idx + chunk_len - 1]
    idx = idx[ok]
    if not len(idx):
      raise ValueError(f"source {self.spec.name!r}: no episode is as long as rvq.chunk_len={chunk_len}")
    return a[idx[:, None] + np.arange(chunk_len)[None]]

  def stats(self) -> dict[str, np.ndarray]:
    if self.mean is not None and self.std is not None:
      return {"mean": np.asarray(self.mean), "std": np.asarray(self.std)}
    flat = self.actions.reshape(-1, self.actions.shape[-1]).astype(np.float64)
    return {"mean": flat.mean(0), "std": flat.std(0)}


def as_sources(source: Mapping[str, Any]) -> dict[str, ActionSource]:
  """Normalise ``{name: ActionSource | (spec, actions[, stats])}``; names must match the specs."""
  if not source:
    raise ValueError("array source: empty (no embodiment has actions)")
  out = {}
  for name, v in source.items():
    if isinstance(v, ActionSource):
      src = v
    elif isinstance(v, (tuple, list)) and len(v) in (2, 3):
      stats = v[2] if len(v) == 3 else None
      mean = None if stats is None else _stat(stats, "mean")
      std = None if stats is None else _stat(stats, "std")
      src = ActionSource(v[0], v[1], mean, std)
    else:
      raise ValueError(f"array source {name!r}: expected (EmbodimentSpec, actions[, stats]) or ActionSource")
    if src.spec.name != name:
      raise ValueError(f"array source {name!r}: its EmbodimentSpec is named {src.spec.name!r}")
    out[name] = src
  return out


def _stat(stats: Any, key: str) -> np.ndarray:
  return np.asarray(stats[key] if isinstance(stats, Mapping) else getattr(stats, key))


def load_tfds_source(data_dir: str, embodiments: Sequence[str], split: str = "train",
                     max_episodes: int = 0) -> tuple[dict[str, ActionSource], list[EmbodimentSpec]]:
  """Actions of each embodiment's episode dataset, with the normalization stats saved beside it.

  Returns (sources of the continuous embodiments, specs of all listed embodiments, discrete included).
  """
  from data_pipelines.rlds_builder import open_dataset

  sources, specs = {}, []
  for name in embodiments:
    ds = open_dataset(data_dir, name)
    specs.append(ds.spec)
    if not ds.spec.action_space.is_continuous:
      continue
    n = ds.num_episodes(split)
    if max_episodes:
      n = min(n, max_episodes)
    actions, starts = [], []
    for i in range(n):
      seq = ds.episode(split, i)["steps"]
      rows = [seq[t] for t in range(len(seq))]
      a = np.stack([np.asarray(r["action"], np.float32) for r in rows if not bool(r["is_last"])])
      actions.append(a)
      starts.append(np.arange(len(a)) == 0)
    stats = ds.normalization.action if ds.normalization is not None else None
    sources[name] = ActionSource(ds.spec, np.concatenate(actions), None if stats is None else stats.mean,
                                 None if stats is None else stats.std, np.concatenate(starts))
  return sources, specs


def load_expert_source(embodiments: Sequence[str], num_episodes: int, seed: int, task_split: str = "train"
                       ) -> tuple[dict[str, ActionSource], list[EmbodimentSpec]]:
  """Actions of fresh expert rollouts (``data_pipelines.experts.rollout``) for each embodiment."""
  from data_pipelines import experts
  from gea_jax.envs import registry

  sources, specs = {}, []
  for name in embodiments:
    spec = registry.make(name).spec
    specs.append(spec)
    if not spec.action_space.is_continuous:
      continue
    episodes = experts.rollout(name, num_episodes, seed, task_split)
    # RLDS: the last step of an episode holds the final observation and a zero action: drop it
    acts = [np.asarray(ep["action"], np.float32).reshape(-1, spec.action_space.dim)[~np.asarray(ep["is_last"])]
            for ep in episodes]
    starts = [np.arange(len(a)) == 0 for a in acts]
    sources[name] = ActionSource(spec, np.concatenate(acts), episode_starts=np.concatenate(starts))
  return sources, specs


# ----------------------------------------------------------------------------------------------------
# Config.


def rvq_config(config: ml_collections.ConfigDict) -> RVQConfig:
  r = config.rvq
  return RVQConfig(num_levels=r.num_levels, codebook_size=r.codebook_size, latent_dim=r.latent_dim,
                   hidden=r.hidden, num_layers=r.num_layers, chunk_len=r.chunk_len,
                   embodiment_dim=r.embodiment_dim, commitment=float(r.commitment),
                   ema_decay=float(r.ema_decay), dead_code_threshold=r.dead_code_threshold)


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ``ConfigError`` (a ValueError) naming the first bad key."""
  require(get(config, "trainer") == "tokenizer", "trainer", "must be 'tokenizer' for this trainer",
          get(config, "trainer"))
  for key in ("num_levels", "codebook_size", "latent_dim", "hidden", "num_layers", "chunk_len",
              "embodiment_dim", "dead_code_threshold"):
    check_type(config, f"rvq.{key}", int)
    positive(config, f"rvq.{key}")
  positive(config, "rvq.commitment", allow_zero=True)
  v = check_type(config, "rvq.ema_decay", float)
  require(0.0 < v < 1.0, "rvq.ema_decay", "must be in (0, 1)", v)
  for key in ("steps", "batch_size", "log_every", "eval_size"):
    check_type(config, f"train.{key}", int)
    positive(config, f"train.{key}")
  positive(config, "train.lr")
  check_type(config, "train.seed", int)
  check_type(config, "train.warmup_steps", int)
  positive(config, "train.warmup_steps", allow_zero=True)
  source = one_of(config, "data.source", SOURCES)
  emb = get(config, "data.embodiments")
  require(isinstance(emb, (list, tuple)) and len(emb) > 0 and all(isinstance(e, str) for e in emb),
          "data.embodiments", "must be a non-empty list of embodiment names", emb)
  require(len(set(emb)) == len(emb), "data.embodiments", "must not repeat a name", emb)
  if source == "tfds":
    d = check_type(config, "data.data_dir", str)
    require(bool(d), "data.data_dir", "must name the TFDS data directory for data.source='tfds'", d)
  check_type(config, "data.max_episodes", int)
  positive(config, "data.max_episodes", allow_zero=True)
  check_type(config, "data.expert_episodes", int)
  positive(config, "data.expert_episodes")
  one_of(config, "vocab.mode", MODES)
  check_type(config, "vocab.llm_vocab_size", int)
  positive(config, "vocab.llm_vocab_size")
  check_mesh(config)


# ----------------------------------------------------------------------------------------------------
# Training.


class Batcher:
  """Equal-weight mixture over embodiments: padded chunks [B, H, dmax] and embodiment ids [B]."""

  def __init__(self, chunks: Sequence[np.ndarray], emb_ids: Sequence[int], dmax: int, seed: int):
    self.chunks = [pad_actions(c, dmax).astype(np.float32) for c in chunks]
    self.emb_ids = np.asarray(emb_ids, np.int32)
    self.rng = np.random.default_rng(seed)

  def __call__(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    which = self.rng.integers(0, len(self.chunks), batch_size)
    out = np.empty((batch_size,) + self.chunks[0].shape[1:], np.float32)
    for j, c in enumerate(self.chunks):
      sel = which == j
      out[sel] = c[self.rng.integers(0, len(c), int(sel.sum()))]
    return out, self.emb_ids[which]


def make_train_step(tx: optax.GradientTransformation):
  """(model, optimizer, actions, emb, key) -> metrics; updates model and optimizer in place."""

  @nnx.jit
  def step(model: ActionTokenizer, opt: nnx.Optimizer, actions, emb, key):
    def loss_fn(m):
      out = m(actions, emb)
      return out["loss"], out

    (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    st = model.ema_update(out["codes"], out["level_inputs"], out["weight"], key)
    return {"loss": out["loss"], "recon": out["recon"], "commit": out["commit"], "row_se": out["row_se"],
            "row_n": out["row_n"], "perplexity": st["perplexity"], "usage": st["usage"],
            "restarted": st["restarted"]}

  return step


def nmse_through_vocab(vocab: ActionVocab, chunks: np.ndarray, emb: int, batch: int = 4096) -> float:
  """MSE / variance of the normalized actions after vocab encode -> decode (de-normalized, clipped)."""
  tok = vocab.tokenizer
  d = vocab.action_dim(emb)
  mean, std = np.asarray(tok.mean[...])[emb, :d], np.asarray(tok.std[...])[emb, :d]
  enc = lambda a: vocab.decode(np.asarray(vocab.encode(a, emb)), emb)
  recon = np.concatenate([np.asarray(enc(chunks[i:i + batch]))[..., :d]
                          for i in range(0, len(chunks), batch)])
  x = (chunks - mean) / std
  xh = (recon - mean) / std
  var = np.mean(np.var(x.reshape(-1, d), axis=0))
  return float(np.mean((xh - x) ** 2) / max(var, 1e-12))


@dataclasses.dataclass
class TrainResult:
  tokenizer: ActionTokenizer
  vocab: ActionVocab
  nmse: dict[str, float]
  history: list[dict[str, float]]


def train(config: ml_collections.ConfigDict, sources: Mapping[str, Any], specs: Sequence[EmbodimentSpec] | None = None,
          *, writer: Any = None, progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
  """Train a tokenizer on an array source; ``specs`` (default: the sources') fixes embodiment ids and may
  add discrete embodiments, which get vocabulary ids but no training data."""
  sources = as_sources(sources)
  specs = tuple(specs) if specs is not None else tuple(s.spec for s in sources.values())
  names = [s.name for s in specs]
  missing = [n for n in sources if n not in names]
  if missing:
    raise ValueError(f"array source has embodiments {missing} that are not in the spec list {names}")
  for n, src in sources.items():
    if src.spec != specs[names.index(n)]:
      raise ValueError(f"array source {n!r}: its EmbodimentSpec differs from the one in the spec list")
  cfg = rvq_config(config)
  t = config.train
  dmax = max_action_dim(specs)
  stats = {n: src.stats() for n, src in sources.items()}
  chunks = [src.chunks(cfg.chunk_len) for src in sources.values()]
  emb_ids = [names.index(n) for n in sources]
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  data_par = mesh.shape["data"] * mesh.shape["fsdp"]
  if t.batch_size % data_par:
    raise ConfigError(f"train.batch_size: must be divisible by the data-parallel mesh size {data_par}, "
                      f"got {t.batch_size}")
  init_key, key = jax.random.split(jax.random.key(t.seed))
  model = sharding.create_sharded(lambda: ActionTokenizer(cfg, specs, stats, rngs=nnx.Rngs(t.seed)), mesh)
  with sharding.use_mesh(mesh):
    sched = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
                                               end_value=t.lr * 0.05)
    tx = optax.adam(sched)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    batcher = Batcher(chunks, emb_ids, dmax, t.seed)
    a0, e0 = batcher(max(t.batch_size, 4 * cfg.codebook_size))
    nnx.jit(lambda m, a, e, k: m.init_codebooks(a, e, k))(model, jnp.asarray(a0), jnp.asarray(e0), init_key)
    step_fn = make_train_step(tx)
    history = []
    from gea_jax.reporting import Progress
    from gea_jax.train.loop_utils import check_finite
    bar = Progress(t.steps, "rvq", log_every=t.log_every) if progress else None
    for step in range(t.steps):
      a, e = batcher(t.batch_size)
      batch = sharding.shard_batch({"a": a, "e": e}, mesh)
      m = step_fn(model, opt, batch["a"], batch["e"], jax.random.fold_in(key, step))
      if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
        m = sharding.host_get(m)
        check_finite({"loss": m["loss"]}, step + 1)
        se, cnt = np.zeros(len(specs)), np.zeros(len(specs))
        np.add.at(se, e, m["row_se"])
        np.add.at(cnt, e, m["row_n"])
        rec = {"loss": float(m["loss"]), "recon": float(m["recon"]), "commit": float(m["commit"])}
        for lv in range(cfg.num_levels):
          rec[f"perplexity/level{lv}"] = float(m["perplexity"][lv])
          rec[f"usage/level{lv}"] = float(m["usage"][lv])
          rec[f"restarted/level{lv}"] = float(m["restarted"][lv])
        for i in emb_ids:  # this step's batch, normalized units
          if cnt[i] > 0:
            rec[f"recon/{names[i]}"] = float(se[i] / cnt[i])
        history.append({"step": step + 1, **rec})
        if writer is not None:
          writer.scalars(step + 1, rec)
        if bar is not None:
          bar.update(step + 1 - bar.step, loss=rec["loss"], recon=rec["recon"],
                     perplexity0=rec["perplexity/level0"])
        if log is not None:
          log(f"step {step + 1}: " + " ".join(f"{k}={v:.4g}" for k, v in rec.items()))
    if bar is not None:
      bar.close()
  vocab = build_vocab(model, llm_vocab_size=config.vocab.llm_vocab_size, mode=config.vocab.mode)
  nmse = {}
  for n, c in zip(sources, chunks):
    sub = c[np.random.default_rng(t.seed + 1).permutation(len(c))[: t.eval_size]]
    nmse[n] = nmse_through_vocab(vocab, sub, names.index(n))
  return TrainResult(model, vocab, nmse, history)


def load_sources(config: ml_collections.ConfigDict) -> tuple[dict[str, ActionSource], list[EmbodimentSpec]]:
  d = config.data
  if d.source == "tfds":
    return load_tfds_source(d.data_dir, list(d.embodiments), d.split, d.max_episodes)
  return load_expert_source(list(d.embodiments), d.expert_episodes, config.train.seed, d.split)


def run(config: ml_collections.ConfigDict, workdir: str, source: Mapping[str, Any] | None = None,
        specs: Sequence[EmbodimentSpec] | None = None) -> TrainResult:
  """Train and write ``WORKDIR/artifact`` + logs + report. ``source`` overrides ``config.data``."""
  from gea_jax.reporting import MetricWriter, is_process_zero, write_report

  validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  if source is None:
    source, specs = load_sources(config)
  with MetricWriter(workdir) as writer:
    result = train(config, source, specs, writer=writer)
    writer.scalars(config.train.steps, {f"nmse/{k}": v for k, v in result.nmse.items()})
    curves = writer.curves()
  path = save_artifact(workdir / "artifact", result.tokenizer, result.vocab, config=config,
                       metrics={"nmse": result.nmse, "final": result.history[-1] if result.history else {}})
  rows = []
  last = result.history[-1] if result.history else {}
  for n, v in result.nmse.items():
    rows.append({"embodiment": n, "action_dim": result.vocab.action_dim(n), "nmse (encode->decode)": v,
                 "train recon (last logged batch)": last.get(f"recon/{n}", float("nan"))})
  levels = [{"level": lv, "perplexity": last.get(f"perplexity/level{lv}"), "usage": last.get(f"usage/level{lv}")}
            for lv in range(config.rvq.num_levels)]
  keep = {k: v for k, v in curves.items() if k in ("loss", "recon") or k.startswith(("recon/", "perplexity/"))}
  write_report(workdir, "RVQ action tokenizer", tables={"Reconstruction": rows, "Codebooks": levels},
               curves=keep, summary={"steps": config.train.steps, "wall_seconds": round(time.time() - t0, 1),
                                     "artifact": str(path), "first_id": result.vocab.first_id,
                                     "num_ids": result.vocab.num_ids,
                                     "tokens_per_action": result.vocab.max_tokens})
  logger.info("RVQ artifact written to %s; nmse %s", path, result.nmse)
  if is_process_zero():
    print(f"rvq: artifact {path}; nmse " + ", ".join(f"{k}={v:.4g}" for k, v in result.nmse.items()), flush=True)
  return result
