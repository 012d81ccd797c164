#!/usr/bin/env bash
# Install peftbench into ./.venv (or $PEFTBENCH_VENV) on a fresh machine.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --test   # + test dependencies
# torch/torchvision are pinned to a pair that works together (on x86_64: the CUDA builds, which also
# run on the CPU). animal-mnist (demo data) is installed without its dependencies: its own loader
# imports TensorFlow, which peftbench never needs (it reads the data files directly).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEFTBENCH_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRA=""
[ "${1:-}" = "--test" ] && EXTRA="[test]"
case "$(uname -m)" in
  x86_64) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) TORCH="torch torchvision" ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q $TORCH
"$VENV/bin/python" -m pip install -q -e ".$EXTRA"
"$VENV/bin/python" -m pip install -q --no-deps "animal-mnist==0.4"
"$VENV/bin/python" -c "import torch, torchvision, timm, peft; print('peftbench installed: torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| peft', peft.__version__)"
