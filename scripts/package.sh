#!/usr/bin/env bash
# Build the Debian package of this checkout with Debian's tools (dpkg-buildpackage,
# debhelper; debian/), for the Debian release this runs on.
#   bash scripts/package.sh [--version VERSION] [OUTDIR]
#                                        the .deb goes to OUTDIR (default: dist/);
#                                        --version: as VERSION, a changelog entry added
#                                        to the copy built (an upgrade to test)
# Installs the build dependencies debian/control names when some are missing (as root,
# or through sudo). Builds in a copy of the checkout, so its .venv and build stay as
# they are. pip fetches the Python dependencies (debian/rules says why).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
VERSION=""
if [ "${1:-}" = "--version" ]; then
    VERSION=${2:?usage: package.sh [--version VERSION] [OUTDIR]}
    shift 2
fi
OUT=$(realpath -m "${1:-dist}")
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
    command -v dpkg-checkbuilddeps >/dev/null || {
        $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends dpkg-dev; }
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get build-dep -y -q ./
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tpmbroker"
# The checkout as git sees it (tracked and new files, not ignored ones such as .venv);
# a tree that is no git checkout (an unpacked copy), without its build products.
if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$SRC" ls-files -z --cached --others --exclude-standard \
        | tar -C "$SRC" --null -T - -cf - | tar -C "$work/tpmbroker" -xf -
else
    tar -C "$SRC" --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.so' \
        --exclude=__pycache__ -cf - . | tar -C "$work/tpmbroker" -xf -
fi
if [ -n "$VERSION" ]; then
    changelog=$work/tpmbroker/debian/changelog
    { printf 'tpmbroker (%s) unstable; urgency=medium\n\n  * Rebuilt as %s.\n\n' \
          "$VERSION" "$VERSION"
      printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l "$changelog" -S Maintainer)" \
          "$(date -R)"
      cat "$changelog"; } >"$changelog.new"
    mv "$changelog.new" "$changelog"
fi
(cd "$work/tpmbroker" && dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1) \
    || { tail -40 "$work/build.log" >&2; echo "package.sh: the build failed" >&2; exit 1; }
mkdir -p "$OUT"
cp "$work"/*.deb "$OUT"/
ls "$OUT"/*.deb
