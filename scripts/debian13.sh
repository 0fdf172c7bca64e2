#!/usr/bin/env bash
# The whole test suite in a Debian 13 (trixie) root: OpenSSL 3.5, Python 3.13, tss2 4.1.
#   sudo bash scripts/debian13.sh [pytest arguments]
#   sudo bash scripts/debian13.sh --shell [command...]   a fresh root, no set-up, no tests
# TPMBROKER_CI_SUITE=bookworm makes the same with Debian 12 (the package test installs
# the Debian 12 package there); TPMBROKER_CI_OUT=DIR is bind-mounted at /out, writable,
# to carry files out of the run (the package test's .deb files).
# The root is made with debootstrap from the host's Debian mirror and the packages
# `setup.sh --packages trixie` names, and cached under $TPMBROKER_CI_CACHE (default
# /var/cache/tpmbroker-ci), keyed by a hash of mirror, suite and package list. Each run
# sees the cached root through a fresh overlay, so nothing of a previous run (checkout,
# .venv, keys, logs) is there; the checkout is copied in, the host's CA bundle, resolver
# and pip configuration too, and setup.sh then test.sh run inside. Everything runs in
# private mount and PID namespaces: when the run ends, however it ends, its mounts and
# processes go with it.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
SUITE=${TPMBROKER_CI_SUITE:-trixie}
OUT=${TPMBROKER_CI_OUT:-}
CACHE=${TPMBROKER_CI_CACHE:-/var/cache/tpmbroker-ci}
ROOT_RECIPE=1  # bump when the way the root is built changes

if [ "$(id -u)" -ne 0 ]; then
    echo "debian13.sh: needs root (debootstrap, mounts, chroot); run it with sudo" >&2
    exit 2
fi

host_mirror() {
    # The host's own Debian mirror: deb822 "URIs:" or one-line "deb URI bookworm main".
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
          | awk '{print $2}' | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)
    [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          2>/dev/null | awk '$3 ~ /^(bookworm|trixie)$/ {print $2; exit}' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${TPMBROKER_DEBIAN_MIRROR:-$(host_mirror)}

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v unshare >/dev/null || need+=(util-linux)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if ((${#need[@]})); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

mapfile -t PACKAGES < <(bash scripts/setup.sh --packages "$SUITE")
key=$(printf '%s\n' "$ROOT_RECIPE" "$SUITE" "$MIRROR" "${PACKAGES[@]}" | sha256sum | cut -c1-16)
base=$CACHE/$SUITE-$key
mkdir -p "$CACHE"

# Files copied from the host into the root of each run.
copy_host_files() {  # root
    install -m 644 /etc/resolv.conf "$1/etc/resolv.conf"
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"
    fi
}

build_root() {
    local tmp=$CACHE/.build-$SUITE-$key.$$
    rm -rf "$tmp"
    echo "debian13.sh: building the $SUITE root from $MIRROR (cache key $key)"
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$tmp" "$MIRROR" \
        >"$CACHE/.build-$SUITE.log" 2>&1 || { tail -30 "$CACHE/.build-$SUITE.log"; rm -rf "$tmp"; exit 1; }
    copy_host_files "$tmp"
    # apt inside needs /proc and /dev: a private mount namespace takes them away after.
    unshare --mount --propagation private --fork bash -euo pipefail -c '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
            sh -c "apt-get install -y -q --no-install-recommends \"\$@\" && apt-get clean" sh "$@"
    ' sh "$tmp" "${PACKAGES[@]}" >>"$CACHE/.build-$SUITE.log" 2>&1 \
        || { tail -30 "$CACHE/.build-$SUITE.log"; rm -rf "$tmp"; exit 1; }
    rm -rf "$tmp/var/lib/apt/lists/"* "$tmp/tmp/"*
    touch "$tmp/.tpmbroker-root-complete"
    mv -T "$tmp" "$base"
    # Roots of older keys are no longer used.
    find "$CACHE" -maxdepth 1 -name "$SUITE-*" ! -name "$SUITE-$key" -exec rm -rf {} +
}

# One build at a time; runs that find the root complete share it read-only (overlay).
exec 9>"$CACHE/.lock"
flock 9
if [ ! -e "$base/.tpmbroker-root-complete" ]; then
    rm -rf "$base" "$CACHE"/.build-"$SUITE"-*
    build_root
else
    echo "debian13.sh: cached $SUITE root $base"
fi
exec 9>&-  # closing the lock file releases it

run=$(mktemp -d /var/tmp/tpmbroker-debian13.XXXXXX)
cleanup() {
    # The namespaces took their mounts with them; only the overlay's layers are left.
    if grep -qs " $run/" /proc/self/mounts; then
        umount -R "$run/root" 2>/dev/null || umount -lR "$run/root" 2>/dev/null || true
    fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$run/upper" "$run/work" "$run/root" "$CACHE/pip-cache"

# The checkout as git sees it (tracked and new files, not ignored ones such as .venv).
git ls-files -z --cached --others --exclude-standard | tar -C "$SRC" --null -T - -cf "$run/src.tar"

# pip's configuration and local wheel directories, as the host's pip sees them.
pip_dirs=()
for d in /opt/wheels /opt/pypi /opt/pypi-more; do [ -d "$d" ] && pip_dirs+=("$d"); done
pip_env=()
while IFS='=' read -r name value; do
    pip_env+=("$name=$value")
done < <(env | grep -E '^PIP_[A-Z_]+=' || true)

if [ "${1:-}" = "--shell" ]; then
    shift
    ((${#@})) || set -- bash -i
    inner=(bash -c 'cd /srv/tpmbroker && exec "$@"' sh "$@")
else
    inner=(bash -c '
        set -euo pipefail
        cd /srv/tpmbroker
        . /etc/os-release
        echo "debian13.sh: Debian $VERSION_ID ($VERSION_CODENAME), $(openssl version | cut -d" " -f1-2), $(python3 --version)"
        bash scripts/setup.sh
        exec bash scripts/test.sh "$@"
    ' sh "$@")
fi

set +e
unshare --mount --propagation private --pid --fork bash -euo pipefail -c '
    run=$1 base=$2 cache=$3 out=$4; shift 4
    root=$run/root
    mount -t overlay overlay -o "lowerdir=$base,upperdir=$run/upper,workdir=$run/work" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mount -t tmpfs tmpfs "$root/tmp"
    mkdir -p "$root/root/.cache/pip"
    mount --bind "$cache/pip-cache" "$root/root/.cache/pip"
    if [ -n "$out" ]; then
        mkdir -p "$root/out" && mount --bind "$out" "$root/out"
    fi
    while [ "$1" != "--" ]; do
        mkdir -p "$root$1" && mount --bind "$1" "$root$1" && mount -o remount,bind,ro "$root$1"
        shift
    done
    shift
    for f in /etc/pip.conf /etc/xdg/pip; do
        [ -e "$f" ] && mkdir -p "$root$(dirname "$f")" && cp -a "$f" "$root$f"
    done
    install -m 644 /etc/resolv.conf "$root/etc/resolv.conf"
    [ -f /etc/ssl/certs/ca-certificates.crt ] && \
        install -m 644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    mkdir -m 755 -p "$root/srv/tpmbroker"
    tar -C "$root/srv/tpmbroker" -xf "$run/src.tar"
    # Not exec: this shell stays PID 1 of the namespace and reaps orphans, so the tests
    # run as ordinary processes (PID 1 ignores signals it has no handler for).
    status=0
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@" || status=$?
    exit "$status"
' sh "$run" "$base" "$CACHE" "$OUT" "${pip_dirs[@]}" -- "${pip_env[@]}" "${inner[@]}"
status=$?
set -e
exit "$status"
