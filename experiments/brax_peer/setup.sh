#!/usr/bin/env bash
# Creates .venv-brax: the benchmark peer venv in which Brax's own PPO trainer runs.
# brax 0.14.2's trainer calls jax.device_put_replicated, removed in jax 0.10, so it needs jax==0.8.3.
# Usage: experiments/brax_peer/setup.sh [VENV_DIR]   (default: .venv-brax at the repo root)
# Makefile:  brax-peer: ; bash experiments/brax_peer/setup.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-brax}"
PY="${PYTHON:-python3.11}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import brax, jax; assert jax.__version__ == '0.8.3'" 2>/dev/null; then
  echo "brax peer venv ready: $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "jax==0.8.3" "jaxlib==0.8.3" "brax==0.14.2"
"$VENV/bin/python" -c "import jax, brax.training.agents.ppo.train as t; print('brax peer venv ready:', jax.__version__)"
