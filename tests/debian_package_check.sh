#!/usr/bin/env bash
# Run inside a clean Debian root by tests/test_debian_package.py (through
# scripts/debian13.sh --shell, the .deb files in /out): install the package, run the
# broker as its unit's ExecStart says, as its user, against swtpm (systemd is not PID 1
# here), sign with `openssl dgst -provider tpmbroker` and nothing else, read the man
# pages, then remove and purge. Prints `check: NAME VALUE` lines the test reads.
# With `upgrade`, instead: install the lowest version in /out, and while clients sign
# (tpmbroker load through the Python client, C threads through the provider),
# install the highest and restart the broker as the package's postinst has systemd do.
#   debian_package_check.sh SWTPM_PORT [upgrade]
set -euo pipefail
port=$1
mode=${2:-use}
export DEBIAN_FRONTEND=noninteractive
check() { echo "check: $*"; }
exists() { if [ -e "$1" ] || [ -L "$1" ]; then echo yes; else echo no; fi; }

apt-get update -q >/dev/null
# man-db is no dependency: installed here to read the pages as a user would.
apt-get install -y -q --no-install-recommends man-db >/dev/null
by_version=$(for f in /out/tpmbroker_*.deb; do echo "$(dpkg-deb -f "$f" Version) $f"; done \
    | sort -V | cut -d' ' -f2)
deb=$(head -1 <<<"$by_version")
apt-get install -y -q --no-install-recommends "$deb" >/tmp/install.log 2>&1 \
    || { cat /tmp/install.log; exit 1; }
check installed "$(dpkg-query -W -f '${Version}' tpmbroker)"
wants=/etc/systemd/system/multi-user.target.wants/tpmbroker.service
check enabled_without_tpm "$(exists "$wants")"
check user "$(id -nG tpmbroker | tr ' ' ,)"
check modules_dir "$(openssl version -m | sed 's/.*"\(.*\)"/\1/')"
check module "$(exists "$(openssl version -m | sed 's/.*"\(.*\)"/\1/')/tpmbroker.so")"
check runtime_dir "$(stat -c %U:%a /run/tpmbroker)"
check state_dir "$(stat -c %U:%a /var/lib/tpmbroker)"
check conffile "$(dpkg-query -W -f '${Conffiles}' tpmbroker | awk '{print $1}' | tr -d ' \n')"
check provider_path "$(tpmbroker provider-path)"
check byte_code "$(find /usr/lib/tpmbroker -name '*.pyc' | grep -c /tpmbroker/cli/)"

# The broker as the unit starts it (ExecStart, User=, SupplementaryGroups=,
# Environment=); the TPM is swtpm here instead of the config's /dev/tpmrm0.
mkdir -p /tmp/tpm
swtpm socket --tpm2 --tpmstate dir=/tmp/tpm --flags not-need-init,startup-clear \
    --server type=tcp,port="$port",bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 &
unit=/lib/systemd/system/tpmbroker.service
setting() { sed -n "s/^$1=//p" "$unit"; }
exec_start=$(setting ExecStart)
check exec_start "$exec_start"
groups=()
for group in $(setting SupplementaryGroups); do groups+=(-G "$group"); done
: >/tmp/broker.log
# shellcheck disable=SC2086
runuser -u "$(setting User)" -g "$(setting Group)" "${groups[@]}" -- \
    env -i "$(setting Environment)" PATH=/usr/bin:/bin \
    $exec_start --tcti "swtpm:host=127.0.0.1,port=$port" 2>/tmp/broker.log &
broker=$!
trap 'echo "--- broker log"; cat /tmp/broker.log' ERR
for _ in $(seq 150); do grep -q "serving on" /tmp/broker.log && break; sleep 0.1; done
check socket "$(stat -c %U:%G:%a /run/tpmbroker/tpmbroker.sock)"

# As root (allow-uid in the packaged config), with no environment of tpmbroker's.
cd /tmp
tpmbroker keygen --alg ec:P-256 -o key.pem
tpmbroker pubkey key.pem >key.pub
echo "signed by the packaged broker" >data
env -u OPENSSL_MODULES -u TPMBROKER_SOCKET \
    openssl dgst -sha256 -provider tpmbroker -sign key.pem -out data.sig data
check verify "$(openssl dgst -sha256 -verify key.pub -signature data.sig data)"
if [ "$mode" = upgrade ]; then
    next=$(tail -1 <<<"$by_version")
    [ "$next" != "$deb" ] || { echo "no second version in /out" >&2; exit 1; }
    tpmbroker load --key key.pem --clients 8 --seconds 30 --timeout 20 >/tmp/load.out 2>&1 &
    load=$!
    # The provider in C threads of one long-lived process, as nginx workers sign
    # (benchmarks/loadgen.c, compiled here against this release's libcrypto).
    gcc -O1 -o /tmp/loadgen /srv/tpmbroker/benchmarks/loadgen.c -lcrypto -lpthread
    /tmp/loadgen timed "$(openssl version -m | sed 's/.*"\(.*\)"/\1/')" key.pem key.pub 8 30 \
        >/tmp/loadgen.out 2>/tmp/loadgen.err &
    provider_load=$!
    sleep 3
    apt-get install -y -q --no-install-recommends "$next" >/tmp/upgrade.log 2>&1 \
        || { cat /tmp/upgrade.log; exit 1; }
    check upgraded "$(dpkg-query -W -f '${Version}' tpmbroker)"
    # both loads still signing when the broker goes
    check signing_at_restart "$(kill -0 "$load" "$provider_load" 2>/dev/null && echo yes || echo no)"
    # `systemctl restart`: SIGTERM (KillMode=mixed: to the broker), wait, ExecStart again
    stopped=$(date +%s.%N)
    kill -TERM "$broker"; wait "$broker" || true
    # shellcheck disable=SC2086
    runuser -u "$(setting User)" -g "$(setting Group)" "${groups[@]}" -- \
        env -i "$(setting Environment)" PATH=/usr/bin:/bin \
        $exec_start --tcti "swtpm:host=127.0.0.1,port=$port" 2>>/tmp/broker.log &
    broker=$!
    for _ in $(seq 300); do
        [ "$(grep -c 'serving on' /tmp/broker.log)" -ge 2 ] && break; sleep 0.1
    done
    # seconds from SIGTERM to the new broker serving (polled every 0.1 s)
    check restart_gap "$(python3 -c "print(round($(date +%s.%N) - $stopped, 1))")"
    check signing_after_restart "$(kill -0 "$load" "$provider_load" 2>/dev/null && echo yes || echo no)"
    wait "$load" || true
    wait "$provider_load" || true
    check load "$(tail -1 /tmp/load.out)"
    # thread I signed N failed F bad B, summed
    check provider_load "$(awk '/^thread / {n++; s += $4; f += $6; b += $8}
        END {print n, s, f, b}' /tmp/loadgen.out)"
    check provider_errors "$(sort /tmp/loadgen.err | uniq -c | head -3 | tr '\n' ' ')"
    check broker_starts "$(grep -c 'serving on /run/tpmbroker/tpmbroker.sock' /tmp/broker.log)"
    exit 0
fi
check signatures "$(tpmbroker status --json | sed -n 's/^ *"signatures": \([0-9]*\).*/\1/p')"

for page in tpmbroker tpmbroker.conf provider-tpmbroker; do
    check man_"$page" "$(MANWIDTH=80 man "$page" 2>/dev/null | head -1 | tr -s ' ')"
done

kill -TERM "$broker"; wait "$broker" || true
check broker_log "$(grep -c 'serving on /run/tpmbroker/tpmbroker.sock' /tmp/broker.log)"

apt-get remove -y -q tpmbroker >/dev/null 2>&1
check removed "$(dpkg-query -W -f '${Status}' tpmbroker)"
check after_remove "cmd=$(exists /usr/bin/tpmbroker) module=$(exists /usr/lib/x86_64-linux-gnu/ossl-modules/tpmbroker.so) unit=$(exists /lib/systemd/system/tpmbroker.service) venv=$(exists /usr/lib/tpmbroker) conf=$(exists /etc/tpmbroker/tpmbroker.conf) state=$(exists /var/lib/tpmbroker)"
apt-get purge -y -q tpmbroker >/dev/null 2>&1
check purged "$(dpkg-query -W -f '${Status}' tpmbroker 2>/dev/null || echo not-installed)"
check after_purge "conf=$(exists /etc/tpmbroker) state=$(exists /var/lib/tpmbroker) venv=$(exists /usr/lib/tpmbroker)"

# Where a TPM exists the service is enabled on install. /dev here is the host's: the
# install runs in a mount namespace of its own whose /dev has a stand-in tpmrm0.
mkdir /tmp/dev
cp -a /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /tmp/dev/
touch /tmp/dev/tpmrm0
unshare --mount --propagation private sh -c '
    mount --bind /tmp/dev /dev && apt-get install -y -q --no-install-recommends "$1"' \
    sh "$deb" >/tmp/install-tpm.log 2>&1 || { cat /tmp/install-tpm.log; exit 1; }
check enabled_with_tpm "$(exists "$wants")"
apt-get purge -y -q tpmbroker >/dev/null 2>&1
check enabled_after_purge "$(exists "$wants")"
