#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu machine, as root or as a normal user:
#   1. optional: Debian's Fashion-MNIST package (only the laptop studies read it) — skipped with a note when it
#      cannot be installed; sudo is used for it only when not root, and for nothing else;
#   2. a virtual environment in .venv with the pinned torch and torchvision;
#   3. this project installed editable with its test extras.
# Run it again at any time: finished steps are quick. Then: .venv/bin/neon toy   (or the tests, see README.md)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)   # also pinned in pyproject.toml and environment.yml

note() { echo "setup: $*" >&2; }

# Root runs apt-get itself; a user goes through sudo if there is one; otherwise there is no way to install.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 127
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_install() {   # apt_install PACKAGE: from the package lists as they are, else after refreshing them
  as_root apt-get install -y "$1" || { as_root apt-get update && as_root apt-get install -y "$1"; }
}

fashion_mnist() {
  if installed dataset-fashion-mnist; then return 0; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    note "no apt-get: skipped the optional dataset-fashion-mnist (only configs/fashion_mnist_16.yaml and" \
         "configs/fashion_mnist_diffusers.yaml need it)"
  elif ! apt_install dataset-fashion-mnist; then
    note "could not install the optional dataset-fashion-mnist (not root and no usable sudo, or no package);" \
         "everything but configs/fashion_mnist_16.yaml and configs/fashion_mnist_diffusers.yaml works without it"
  fi
}

venv() {
  if [ -x .venv/bin/python ]; then return 0; fi
  if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    # Debian ships venv's pip bootstrap separately; only root installs it here (not one of sudo's jobs).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt_install python3-venv
    else
      note "$PYTHON cannot make a virtual environment: install python3-venv (apt-get install python3-venv)"
      exit 1
    fi
  fi
  "$PYTHON" -m venv .venv
}

fashion_mnist
venv
# pip is quiet; say what each step does and how long it takes, so minutes of silence read as work.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  note "installing ${TORCH_PINS[*]} into .venv: about 5.6 GB with the CUDA libraries, 3-5 minutes"
fi
.venv/bin/python -m pip install --quiet "${TORCH_PINS[@]}"
note "installing this project and its test tools (diffusers, torch-fidelity, pytest, ...) into .venv"
.venv/bin/python -m pip install --quiet -e '.[test]'
note "done: .venv holds $(du -sh .venv 2>/dev/null | cut -f1). .venv/bin/neon toy runs the main job" \
     "(neon toy --quick: under 30 s); .venv/bin/python -m pytest -q runs the tests; source .venv/bin/activate" \
     "puts neon, torchrun and python on PATH for the other commands"
