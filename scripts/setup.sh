#!/usr/bin/env bash
# Idempotent set-up on Debian 12 (bookworm) or Debian 13 (trixie): system packages, then
# .venv with tpmbroker and its dev extra.
#   bash scripts/setup.sh                    set up this machine
#   bash scripts/setup.sh --packages SUITE   print the Debian packages SUITE needs, and stop
set -euo pipefail
cd "$(dirname "$0")/.."

# The same names on both releases.
COMMON=(
    swtpm swtpm-tools libtss2-dev libtss2-tcti-tabrmd0 tpm2-abrmd tpm2-tools
    libssl-dev openssl pkg-config gcc binutils python3 python3-venv python3-dev
    nginx curl dbus tpm2-openssl
    libtpm2-pkcs11-1 libtpm2-pkcs11-tools libengine-pkcs11-openssl p11-kit
    # Tests send signals with /bin/kill and run clients as www-data with runuser:
    # procps and util-linux are not in a minimal root.
    procps util-linux
    prometheus prometheus-node-exporter
    # python -m benchmarks.broker_cpu --meter instructions: the broker under callgrind.
    valgrind
)

# Building the Debian package (scripts/package.sh, docs/install.md), beyond the above;
# the same names on both releases. Not part of `--packages`: the roots debian13.sh makes
# from that list stay clean, and package.sh installs these in them itself.
BUILD=(debhelper devscripts fakeroot dpkg-dev)

packages_for() {
    case "$1" in
        bookworm)
            # TCTIs the broker and tests load by name (tss2 3.2).
            echo "${COMMON[@]}" libtss2-tcti-swtpm0 libtss2-tcti-device0 ;;
        trixie)
            # tss2 4.1 after the 64-bit time_t transition: the libraries carry t64.
            # OpenSSL 3.5's FIPS provider is packaged here (not in bookworm).
            echo "${COMMON[@]}" libtss2-tcti-swtpm0t64 libtss2-tcti-device0t64 openssl-provider-fips ;;
        *)
            echo "setup.sh: no package list for Debian '$1' (known: bookworm, trixie)" >&2
            return 1 ;;
    esac
}

if [ "${1:-}" = "--packages" ]; then
    packages_for "${2:?usage: setup.sh --packages SUITE}" | tr ' ' '\n'
    exit 0
fi

# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
read -r -a PACKAGES <<<"$(packages_for "$codename")"
PACKAGES+=("${BUILD[@]}")

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
provider=$(.venv/bin/tpmbroker provider-path)
echo "tpmbroker installed in .venv; provider at $provider"

# nginx's workers (www-data) load the provider from this path: every directory above it
# must be searchable and the file readable by others.
if id www-data >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v runuser >/dev/null 2>&1 \
        && ! runuser -u www-data -- test -r "$provider"; then
    echo "note: www-data cannot read $provider; nginx workers and the tests that run" \
         "clients as www-data need o+x on each directory above it and o+r on the file" >&2
fi
echo "tpmbroker installed in .venv; provider at $(.venv/bin/tpmbroker provider-path)"
echo "put the tpmbroker command on your PATH: source .venv/bin/activate"
