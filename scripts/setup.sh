#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages, a virtualenv in .venv, the package and its
# declared dependencies in ONE pip command (a later open_clip install would upgrade timm past nerfstudio's pin).
# A second run reuses everything: pip runs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${GSSTUDIO_EXTRAS:-test}"
VENV="${GSSTUDIO_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

need_debs=()
for deb in libusb-1.0-0 libgl1 libglib2.0-0 ${GSSTUDIO_DEBS:-}; do
    dpkg -s "$deb" >/dev/null 2>&1 || need_debs+=("$deb")
done
if [ ${#need_debs[@]} -gt 0 ]; then
    echo "[setup] installing Debian packages: ${need_debs[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_debs[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv "$VENV"; }

stamp="$VENV/.gsstudio-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing gsstudio_ext[$EXTRAS] and its dependencies (first time: several minutes, ~8 GB)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
else
    echo "[setup] $VENV is up to date"
fi
