"""The self-describing RVQ tokenizer artifact: one orbax directory that SFT, PPO and export load alone.

Layout (an orbax composite checkpoint, written to a temporary sibling and renamed into place, so a
failed save never replaces a good artifact)::

  PATH/state/      StandardSave: the tokenizer's nnx state as a pure dict (networks, codebooks and
                   their EMA statistics, per-embodiment normalization mean/std, bounds, masks)
  PATH/metadata/   JsonSave: {"format": "gea_jax.rvq_tokenizer", "format_version", "rvq" (RVQConfig),
                   "specs" (EmbodimentSpecs), "vocab" (VocabLayout), "normalization" (per embodiment
                   mean/std as JSON, for readers without orbax), "config" (the training config),
                   "metrics", "versions"}

``load_artifact(path) -> (ActionTokenizer, ActionVocab)``; ``read_metadata(path)`` reads the JSON only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gea_jax import sharding
from gea_jax.checkpoint import config_to_json, versions
from gea_jax.envs.spec import EmbodimentSpec
from gea_jax.tokenizers.action_vocab import ActionVocab, VocabLayout
from gea_jax.tokenizers.rvq import ActionTokenizer, RVQConfig

FORMAT = "gea_jax.rvq_tokenizer"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
  """An artifact directory is missing, damaged or not an RVQ tokenizer artifact (names the path)."""


def _host_pure_dict(tokenizer: ActionTokenizer) -> dict:
  return sharding.host_get(nnx.to_pure_dict(nnx.state(tokenizer)))  # gathered in a multi-host job


def _normalization_json(tokenizer: ActionTokenizer) -> dict[str, Any]:
  mean, std = np.asarray(tokenizer.mean[...]), np.asarray(tokenizer.std[...])
  out = {}
  for i, spec in enumerate(tokenizer.specs):
    if spec.action_space.is_continuous:
      d = spec.action_space.dim
      out[spec.name] = {"mean": mean[i, :d].astype(float).tolist(), "std": std[i, :d].astype(float).tolist()}
  return out


def save_artifact(path: str | os.PathLike, tokenizer: ActionTokenizer, vocab: ActionVocab, *,
                  config: Any = None, metrics: dict | None = None) -> Path:
  """Write the artifact directory at ``path`` (replacing an existing one only once the new one is complete)."""
  path = Path(path).absolute()
  if vocab.tokenizer is not None and vocab.tokenizer is not tokenizer:
    raise ValueError("save_artifact: vocab was built for a different tokenizer")
  if tuple(s.name for s in vocab.specs) != tokenizer.names:
    raise ValueError(f"save_artifact: vocab embodiments {list(vocab.names)} differ from the tokenizer's "
                     f"{list(tokenizer.names)}")
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rvq": tokenizer.cfg.to_json(),
          "specs": [s.to_json() for s in tokenizer.specs], "vocab": vocab.layout.to_json(),
          "normalization": _normalization_json(tokenizer), "config": config_to_json(config),
          "metrics": metrics or {}, "versions": versions()}
  tmp = path.parent / f".{path.name}.tmp-{_job_unique_suffix()}"  # one directory for all processes of a job
  path.parent.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(tmp, args=ocp.args.Composite(state=ocp.args.StandardSave(_host_pure_dict(tokenizer)),
                                          metadata=ocp.args.JsonSave(meta)))
  ckptr.close()
  if jax.process_index() == 0:
    old = None
    if path.exists():
      old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
      path.rename(old)
    tmp.rename(path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  from gea_jax import distributed
  distributed.barrier(f"rvq artifact {path}")  # no process reads the artifact before process 0 has put it in place
  return path


def _job_unique_suffix() -> str:
  """A random hex suffix, the same on every process of a multi-host job (process 0's)."""
  value = int(uuid.uuid4().hex[:7], 16)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    value = int(multihost_utils.broadcast_one_to_all(np.int32(value)))
  return f"{value:07x}"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The artifact's JSON metadata (no arrays); ArtifactError naming the path if it is not an artifact."""
  path = Path(path)
  if not path.is_dir():
    raise ArtifactError(f"{path}: RVQ tokenizer artifact not found (expected a directory)")
  try:
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = ckptr.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  except Exception as e:  # orbax raises several types for a missing/damaged item
    raise ArtifactError(f"{path}: cannot read the artifact metadata ({type(e).__name__}: {e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ArtifactError(f"{path}: not an RVQ tokenizer artifact (metadata.format != {FORMAT!r})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ArtifactError(f"{path}: artifact format_version {meta.get('format_version')} is not supported "
                        f"(this code reads {FORMAT_VERSION})")
  return meta


def load_artifact(path: str | os.PathLike) -> tuple[ActionTokenizer, ActionVocab]:
  """Restore the tokenizer (on the default device) and its vocabulary from ``path`` alone."""
  path = Path(path)
  meta = read_metadata(path)
  try:
    cfg = RVQConfig.from_json(meta["rvq"])
    specs = tuple(EmbodimentSpec.from_json(s) for s in meta["specs"])
    layout = VocabLayout.from_json(meta["vocab"])
  except (KeyError, TypeError, ValueError) as e:
    raise ArtifactError(f"{path}: bad artifact metadata ({type(e).__name__}: {e})") from e
  abstract = nnx.eval_shape(lambda: ActionTokenizer(cfg, specs, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  device = jax.local_devices()[0]
  target = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
      nnx.to_pure_dict(abstract_state))
  try:
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = ckptr.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:
    raise ArtifactError(f"{path}: cannot restore the tokenizer arrays ({type(e).__name__}: {e})") from e
  restored = nnx.restore_int_paths(restored)
  nnx.replace_by_pure_dict(abstract_state, restored)
  tokenizer = nnx.merge(graphdef, abstract_state)
  return tokenizer, ActionVocab(layout, tokenizer)
