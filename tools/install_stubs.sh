#!/bin/sh
# Install the official MicroPython type stubs of each port into separate
# directories (they must not mix: both define machine, network, ...), for
# tests/host/test_boards.py's mypy check. Idempotent; Makefile-friendly.
#   tools/install_stubs.sh [PYTHON]     (default .venv/bin/python)
set -eu
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
DEST="${MTR_STUBS_DIR:-.venv/mpstubs}"
VER="1.29.0.post1"
install() {  # port package
    if [ ! -f "$DEST/$1/.installed-$VER" ]; then
        rm -rf "$DEST/$1"
        "$PY" -m pip install --quiet --disable-pip-version-check --target "$DEST/$1" "$2==$VER"
        touch "$DEST/$1/.installed-$VER"
    fi
}
install esp32 micropython-esp32-stubs
install rp2 micropython-rp2-rpi-pico-w-stubs
"$PY" -c "import mypy" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "mypy>=1.10"
