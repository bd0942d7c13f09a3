#!/usr/bin/env bash
# Install CLISC and its test tools into ./.venv (or into the active virtual environment).
# Without an NVIDIA GPU it installs the CPU build of torch and never pulls the multi-GB CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${CLISC_TORCH_VERSION:-2.13.0}"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "Keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" = Darwin ]; then
  pip_install "torch==$TORCH_VERSION"
else
  # The CPU build: from PyTorch's CPU index, or a local +cpu wheel that pip's find-links already offers.
  pip_install --retries 0 "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
fi

# Pin the torch just installed so that nothing below replaces it (torchvision then picks its matching release).
"$PY" -c "import torch; print('torch==' + torch.__version__)" > .venv-torch-constraint.txt
pip_install -c .venv-torch-constraint.txt -e ".[test]"
rm -f .venv-torch-constraint.txt
"$PY" -c "import clisc, torch; print('CLISC', clisc.__version__, 'with torch', torch.__version__, \
'(CUDA available)' if torch.cuda.is_available() else '(CPU)')"
