#!/usr/bin/env bash
# Build the separate benchmark environment for benchmarks/bench_peers.py: the peer duplicate finders
# (imagededup, cleanvision) next to diffaudit, in their own venv so that they never enter diffaudit's dependencies.
#
#   bash benchmarks/setup_peers.sh [VENV]      # default VENV: /work/peers-venv (or $PEERS_VENV)
#
# then:  IMMACULATE_PYTHON=VENV-py312/bin/python VENV/bin/python benchmarks/bench_peers.py
#
# torch/torchvision are pinned to the versions diffaudit's own venv uses, installed first so that the peers'
# requirements do not pull another torch. A peer that fails to install is reported and skipped: bench_peers.py
# lists it as "not installed" with the reason recorded in VENV/peers-install.log.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${1:-${PEERS_VENV:-/work/peers-venv}}"
TORCH="${TORCH_VERSION:-2.14.1}"
TORCHVISION="${TORCHVISION_VERSION:-0.29.1}"

set -e
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --upgrade pip >/dev/null
"$PY" -m pip install "torch==$TORCH" "torchvision==$TORCHVISION"
"$PY" -m pip install -e "$REPO"
set +e

LOG="$VENV/peers-install.log"
: > "$LOG"
for peer in imagededup cleanvision; do
  echo "== installing $peer" | tee -a "$LOG"
  if "$PY" -m pip install "$peer" >>"$LOG" 2>&1; then
    echo "$peer: installed" | tee -a "$LOG"
  else
    echo "$peer: FAILED to install (see $LOG)" | tee -a "$LOG"
  fi
done
"$PY" - <<'EOF'
import importlib
for name in ("diffaudit", "imagededup", "cleanvision"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}: importable")
    except Exception as e:  # report, do not fail: the benchmark skips a missing peer
        print(f"{name}: NOT importable ({type(e).__name__}: {e})")
EOF

# Immaculate needs Python >= 3.12: its own venv ($IMMACULATE_VENV, default VENV-py312), used by bench_peers.py through
# IMMACULATE_PYTHON and by peers_photos.py directly. Skipped (reported) when no Python 3.12 is found.
IVENV="${IMMACULATE_VENV:-${VENV}-py312}"
PY312=""
for cand in python3.12 "$(PYENV_VERSION=3.12.1 pyenv which python3 2>/dev/null)"; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    PY312="$cand"; break
  fi
done
if [ -z "$PY312" ] && PYENV_VERSION=3.12.1 python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  PY312="env PYENV_VERSION=3.12.1 python3"
fi
if [ -z "$PY312" ]; then
  echo "immaculate: skipped (no Python >= 3.12 found)" | tee -a "$LOG"
else
  [ -x "$IVENV/bin/python" ] || $PY312 -m venv "$IVENV"
  if "$IVENV/bin/python" -m pip install "immaculate[sscd]" numpy >>"$LOG" 2>&1; then
    echo "immaculate: installed in $IVENV  (run: IMMACULATE_PYTHON=$IVENV/bin/python $PY benchmarks/bench_peers.py)" | tee -a "$LOG"
  else
    echo "immaculate: FAILED to install (see $LOG)" | tee -a "$LOG"
  fi
fi
