#!/usr/bin/env bash
# Install CLISC and its test tools into ./.venv (or into the active virtual environment).
# A torch already there is kept, with its CUDA or CPU flavour, and so is its torchvision. Without an NVIDIA GPU
# it installs the CPU build of torch and never pulls the multi-GB CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${CLISC_TORCH_VERSION:-2.13.0}"
CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
version_of() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }

if [ -n "$(version_of torch)" ]; then
  echo "Keeping the installed torch $(version_of torch)"
elif command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" = Darwin ]; then
  pip_install "torch==$TORCH_VERSION"
else
  # The CPU build: from PyTorch's CPU index, or a local +cpu wheel that pip's find-links already offers.
  pip_install --retries 0 "torch==$TORCH_VERSION" --extra-index-url "$CPU_INDEX"
fi
TORCH="$(version_of torch)"

# pip cannot be told "the torchvision paired with the installed torch": left alone it takes the newest
# torchvision, which brings its own torch. So the torch here is pinned, and a missing torchvision is installed
# first as the release paired with it (torch 2.M pairs with torchvision 0.(M+15)).
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"
if [ -z "$(version_of torchvision)" ]; then
  PAIRED="$("$PY" -c "from clisc.environment import paired_torchvision; print(paired_torchvision('$TORCH'))")"
  case "$TORCH" in
    *+cpu) pip_install --retries 0 -c "$CONSTRAINTS" "torchvision==$PAIRED.*" --extra-index-url "$CPU_INDEX" ;;
    *) pip_install -c "$CONSTRAINTS" "torchvision==$PAIRED.*" ;;
  esac
fi
echo "torchvision==$(version_of torchvision)" >> "$CONSTRAINTS"
pip_install -c "$CONSTRAINTS" -e ".[test]"

# Where the plain import fails, a .pth file makes every Python of this environment (the user's own scripts too)
# retry it with the fallback operators, only after the real import has failed (clisc/torchvision_hook.py).
PTH="$("$PY" -c "import sysconfig; from clisc.torchvision_hook import PTH_NAME; \
print(sysconfig.get_paths()['purelib'] + '/' + PTH_NAME)")"
rm -f "$PTH"
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  "$PY" -c "from clisc.torchvision_hook import write_pth; write_pth()"
  echo "Note: torchvision $(version_of torchvision) does not load its compiled operators beside torch $TORCH."
  echo "  PyPI's Linux torchvision wheels are CUDA builds; the build that matches a CPU torch is only on"
  echo "  $CPU_INDEX, and pip could not get it from there (unreachable, or no such build)."
  echo "  CLISC works all the same (a pure-torch nms, the one compiled operator it uses) and says so in one"
  echo "  warning per run; so does 'import torchvision' or 'import open_clip' in your own scripts here, through"
  echo "  $PTH. Where that index can be reached, this installs the matching build:"
  echo "  $PY -m pip install 'torchvision==$(version_of torchvision | cut -d+ -f1)+cpu' --index-url $CPU_INDEX"
fi
"$PY" -c "import clisc, torch; from clisc.torchvision_compat import import_torchvision; \
print('CLISC', clisc.__version__, 'with torch', torch.__version__, 'and torchvision', import_torchvision().__version__, \
'(CUDA available)' if torch.cuda.is_available() else '(CPU)')"
