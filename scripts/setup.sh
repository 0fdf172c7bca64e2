#!/usr/bin/env bash
# Idempotent set-up on Debian 12: system packages, then .venv with tpmbroker and its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    swtpm swtpm-tools libtss2-dev libtss2-tcti-tabrmd0 tpm2-abrmd tpm2-tools
    libssl-dev openssl pkg-config gcc binutils python3 python3-venv python3-dev
    nginx curl dbus tpm2-openssl
    libtpm2-pkcs11-1 libtpm2-pkcs11-tools libengine-pkcs11-openssl p11-kit
    prometheus prometheus-node-exporter
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# nginx and Prometheus are test dependencies, not services of this machine.
for service in nginx prometheus prometheus-node-exporter; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "tpmbroker installed in .venv; provider at $(.venv/bin/tpmbroker provider-path)"
echo "put the tpmbroker command on your PATH: source .venv/bin/activate"
