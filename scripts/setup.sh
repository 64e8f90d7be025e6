#!/usr/bin/env bash
# Set up pcbench in ./.venv from scratch: system library for open3d, CPU torch where there is no CUDA,
# then pcbench itself (editable) with the benchmark peers and test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# open3d's wheel links against libusb-1.0 (Debian: libusb-1.0-0), absent on minimal images.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing libusb-1.0-0 (needed by open3d)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0) >/dev/null
    else
        echo "[setup] WARNING: libusb-1.0 is missing and cannot be installed here (not root or no apt-get)." >&2
        echo "[setup]          open3d will not import; install your distribution's libusb-1.0 package." >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null

# Take the CPU build of torch on machines without an NVIDIA driver: the default wheel pulls several GB of CUDA.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$VPY" -m pip install -q "torch>=2.1"
    else
        "$VPY" -m pip install -q "torch==2.13.0" \
            || "$VPY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.1"
    fi
fi
"$VPY" -m pip install -q -e ".[bench,dev]"
"$VPY" -c "import pcbench, torch; print(f'[setup] pcbench {pcbench.__version__} ready (torch {torch.__version__})')"
