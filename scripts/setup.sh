#!/usr/bin/env bash
# Create .venv inside this checkout and install pkd (editable) with its test extras.
# On a CUDA machine pip takes PyPI's CUDA build of the pinned torch; on a CPU-only machine put a CPU build
# into .venv first (see README), this script keeps an existing .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# open3d's wheel links against libusb-1.0, which slim Debian/Ubuntu images lack.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y libusb-1.0-0 >/dev/null 2>&1 \
        || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y libusb-1.0-0 >/dev/null; }
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "pkd installed in $(pwd)/.venv"
