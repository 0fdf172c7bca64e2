#!/usr/bin/env bash
# The main job end to end: a broker on the default TPM (the embedded simulator when the
# machine has no /dev/tpmrm0), verified by its EK certificate, keys made in the TPM, signatures checked by openssl,
# a key attested as resident in the TPM and the statement verified offline,
# the provider signing a certificate and serving TLS, and the session pool holding
# while many clients sign at once; a CMS message decrypted and an ECDH secret derived
# with TPM keys; a software key moved into the TPM, a PCR-bound key, persistent keys; a
# restart the signing clients do not notice, and the broker's Prometheus metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
WORK=$(mktemp -d /tmp/tpmbroker-demo.XXXXXX)
export TPMBROKER_SOCKET=$WORK/tpmbroker.sock
BROKER_PID=""
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "broker: tpmbroker serve (TPM: ${TPMBROKER_TCTI:-default})"
# The embedded simulator is made with EK certificates from a local CA and verified
# against it; a TPM device is verified against its maker's CA if TPMBROKER_EK_CA names it.
EK_CA=()
[ -n "${TPMBROKER_EK_CA:-}" ] && EK_CA=(--ek-ca "$TPMBROKER_EK_CA")
start_broker() {
    "$BIN/tpmbroker" serve --state-dir "$WORK/state" --sessions 2 --log-level warning \
        --metrics-file "$WORK/tpmbroker.prom" --metrics-interval 1 "${EK_CA[@]}" &
    BROKER_PID=$!
    for _ in $(seq 100); do
        "$BIN/tpmbroker" status >/dev/null 2>&1 && break
        kill -0 "$BROKER_PID" 2>/dev/null || { echo "broker failed to start" >&2; exit 1; }
        sleep 0.1
    done
}
start_broker
"$BIN/tpmbroker" status

step "the TPM's identity: its EK certificate checked against the EK CA, sessions salted to the EK"
"$BIN/tpmbroker" status | grep -E '^tpm_(identity|ek|ek_kind|ek_certificate) '
if [ -z "${TPMBROKER_TCTI:-}" ] && [ ! -e /dev/tpmrm0 ]; then
    openssl x509 -in "$WORK/state/ek-ca/ek-anchors.pem" -noout -subject
fi

step "keys made inside the TPM (TSS2 PRIVATE KEY files)"
"$BIN/tpmbroker" keygen --alg ec:P-256 -o "$WORK/ec.pem"
"$BIN/tpmbroker" keygen --alg rsa:2048 -o "$WORK/rsa.pem"
head -1 "$WORK/ec.pem"
"$BIN/tpmbroker" pubkey "$WORK/ec.pem" -o "$WORK/ec.pub"
"$BIN/tpmbroker" pubkey "$WORK/rsa.pem" -o "$WORK/rsa.pub"

step "signatures made by the TPM, verified by openssl alone"
echo "hello from the TPM" > "$WORK/msg.txt"
"$BIN/tpmbroker" sign --key "$WORK/ec.pem" --in "$WORK/msg.txt" --out "$WORK/ec.sig"
openssl dgst -sha256 -verify "$WORK/ec.pub" -signature "$WORK/ec.sig" "$WORK/msg.txt"
"$BIN/tpmbroker" sign --key "$WORK/rsa.pem" --scheme pss --in "$WORK/msg.txt" --out "$WORK/rsa.sig"
openssl dgst -sha256 -verify "$WORK/rsa.pub" -sigopt rsa_padding_mode:pss \
    -sigopt rsa_pss_saltlen:digest -signature "$WORK/rsa.sig" "$WORK/msg.txt"

if [ -z "${TPMBROKER_TCTI:-}" ] && [ ! -e /dev/tpmrm0 ]; then
    # On a real TPM the anchors are its maker's roots (docs/attestation.md).
    step "key attestation: the TPM proves the key is resident, verified offline"
    CHALLENGE=$(openssl rand -hex 16)
    "$BIN/tpmbroker" attest "$WORK/ec.pem" --challenge-hex "$CHALLENGE" \
        -o "$WORK/statement.json" --attestation-ca-out "$WORK/attestation-ca.pem"
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d["fmt"], sorted(d["attStmt"]))' \
        "$WORK/statement.json"
    "$BIN/tpmbroker" attest --verify "$WORK/statement.json" \
        --ek-ca "$WORK/state/ek-ca/ek-anchors.pem" --attestation-ca "$WORK/attestation-ca.pem" \
        --challenge-hex "$CHALLENGE"
    # The same statement with another challenge: refused, the field named.
    "$BIN/tpmbroker" attest --verify "$WORK/statement.json" \
        --ek-ca "$WORK/state/ek-ca/ek-anchors.pem" --attestation-ca "$WORK/attestation-ca.pem" \
        --challenge-hex 00 && exit 1 || true
fi

PROVIDER_DIR=$(dirname "$("$BIN/tpmbroker" provider-path)")
OSSL=(-provider-path "$PROVIDER_DIR" -provider default -provider tpmbroker)
step "openssl -provider tpmbroker: a self-signed certificate from the TPM key"
# It issues a certificate below, so it says it is a CA: OpenSSL 3.5 refuses to chain to
# one that does not, whatever the system's openssl.cnf adds by default.
openssl req -new -x509 "${OSSL[@]}" -key "$WORK/ec.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,digitalSignature,keyCertSign -days 30 -out "$WORK/ec.crt"
openssl x509 -in "$WORK/ec.crt" -noout -subject -issuer
openssl verify -CAfile "$WORK/ec.crt" "$WORK/ec.crt"

step "the key as openssl sees it: the TPM's attributes, parent and password (-text)"
openssl pkey "${OSSL[@]}" -in "$WORK/ec.pem" -text -noout | head -4

step "random numbers from the TPM, encrypted on the TPM's bus"
"$BIN/tpmbroker" random 32 --hex
openssl rand -provider-path "$PROVIDER_DIR" -provider tpmbroker -hex 16

step "CMS: a message encrypted to a TPM key's certificate, decrypted by the TPM"
"$BIN/tpmbroker" keygen --alg rsa:2048 --usage decrypt -o "$WORK/decrypt.pem"
openssl pkey "${OSSL[@]}" -in "$WORK/decrypt.pem" -pubout -out "$WORK/decrypt.pub"
# A decryption-only key cannot sign its own request: the TPM EC key above issues its
# certificate, with the TPM key's public key put in.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null \
    -subj /CN=recipient -out "$WORK/decrypt.csr" 2>/dev/null
openssl x509 -req "${OSSL[@]}" -in "$WORK/decrypt.csr" -force_pubkey "$WORK/decrypt.pub" \
    -CA "$WORK/ec.crt" -CAkey "$WORK/ec.pem" -CAcreateserial -days 30 \
    -out "$WORK/decrypt.crt" 2>/dev/null
echo "for the TPM's eyes only" | openssl cms -encrypt -aes256 -recip "$WORK/decrypt.crt" \
    -keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256 -out "$WORK/msg.cms"
openssl cms -decrypt "${OSSL[@]}" -in "$WORK/msg.cms" -inkey "$WORK/decrypt.pem" \
    -recip "$WORK/decrypt.crt"

step "ECDH: a TPM key and a software peer derive the same secret"
"$BIN/tpmbroker" keygen --alg ec:P-256 --usage decrypt -o "$WORK/ecdh.pem"
openssl pkey "${OSSL[@]}" -in "$WORK/ecdh.pem" -pubout -out "$WORK/ecdh.pub"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/peer.pem"
openssl pkey -in "$WORK/peer.pem" -pubout -out "$WORK/peer.pub"
openssl pkeyutl "${OSSL[@]}" -derive -inkey "$WORK/ecdh.pem" -peerkey "$WORK/peer.pub" \
    -out "$WORK/ours.secret"
openssl pkeyutl -derive -inkey "$WORK/peer.pem" -peerkey "$WORK/ecdh.pub" -out "$WORK/theirs.secret"
cmp "$WORK/ours.secret" "$WORK/theirs.secret"
echo "shared secret (x-coordinate, $(wc -c <"$WORK/ours.secret") bytes) equal on both sides"

step "TLS 1.3 served by openssl s_server with the TPM key, fetched by curl"
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
openssl s_server "${OSSL[@]}" -key "$WORK/ec.pem" -cert "$WORK/ec.crt" \
    -accept "127.0.0.1:$PORT" -www -quiet </dev/null >"$WORK/s_server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 50); do
    curl -s -o /dev/null --cacert "$WORK/ec.crt" --resolve "localhost:$PORT:127.0.0.1" \
        "https://localhost:$PORT/" && break
    sleep 0.1
done
curl -sS --tlsv1.3 --cacert "$WORK/ec.crt" --resolve "localhost:$PORT:127.0.0.1" \
    -w 'curl: HTTP %{http_code} over %{ssl_verify_result}=verified, TLS ok\n' \
    -o /dev/null "https://localhost:$PORT/"
kill "$SERVER_PID"; SERVER_PID=""

step "an existing software key moved into the TPM (keygen --wrap), the original destroyed"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/old.key" 2>/dev/null
openssl pkey -in "$WORK/old.key" -pubout -out "$WORK/old.pub"
"$BIN/tpmbroker" keygen --wrap "$WORK/old.key" -o "$WORK/old.tpm.pem" 2>/dev/null
shred -u "$WORK/old.key"
"$BIN/tpmbroker" sign --key "$WORK/old.tpm.pem" --in "$WORK/msg.txt" --out "$WORK/old.sig"
openssl dgst -sha256 -verify "$WORK/old.pub" -signature "$WORK/old.sig" "$WORK/msg.txt"

step "a key bound to PCR 16: it signs only while the platform's state matches"
"$BIN/tpmbroker" keygen --pcr-lock sha256:16 -o "$WORK/pcr.pem"
"$BIN/tpmbroker" sign --key "$WORK/pcr.pem" --in "$WORK/msg.txt" --out "$WORK/pcr.sig"
"$BIN/tpmbroker" pubkey "$WORK/pcr.pem" -o "$WORK/pcr.pub"
openssl dgst -sha256 -verify "$WORK/pcr.pub" -signature "$WORK/pcr.sig" "$WORK/msg.txt"

if [ -z "${TPMBROKER_TCTI:-}" ] && [ ! -e /dev/tpmrm0 ]; then
    # Only on the embedded simulator: a real TPM's persistent handles are its owner's.
    step "persistent keys: persist, list, sign by handle:, evict"
    "$BIN/tpmbroker" persist "$WORK/ec.pem" 0x81000100
    "$BIN/tpmbroker" keys | sed -n 1,4p  # sed reads it all: no broken pipe for keys
    openssl dgst -sha256 "${OSSL[@]}" -sign handle:0x81000100 -out "$WORK/handle.sig" \
        "$WORK/msg.txt"
    openssl dgst -sha256 -verify "$WORK/ec.pub" -signature "$WORK/handle.sig" "$WORK/msg.txt"
    "$BIN/tpmbroker" evict 0x81000100
fi

step "64 clients signing at once for 5 s through the pool of 2 sessions"
"$BIN/tpmbroker" load --key "$WORK/ec.pem" --clients 64 --seconds 5
"$BIN/tpmbroker" status

step "the broker restarted while 16 clients sign: nobody notices"
"$BIN/tpmbroker" load --key "$WORK/ec.pem" --clients 16 --seconds 4 &
LOAD_PID=$!
sleep 1.5
kill "$BROKER_PID" && wait "$BROKER_PID" 2>/dev/null || true
start_broker
wait "$LOAD_PID"

step "Prometheus metrics, for node_exporter's textfile collector (--metrics-file)"
sleep 1.2
grep -E '^tpmbroker_(operations_total|pool_sessions|tpm_lockout_counter|connections_accepted_total)' \
    "$WORK/tpmbroker.prom"
echo
echo "demo complete"
