#!/usr/bin/env bash
# Create a test PKI for a RankFed federation with openssl: a CA, a server certificate,
# one client certificate per device (CN = device name) and operator certificates
# (OU=operators, which open the operator API under mutual TLS).
#
#   deploy/make-certs.sh OUT_DIR [--server-name NAME]... [--device NAME]... [--operator NAME]... [--days N]
#
# Defaults: server names localhost, 127.0.0.1, ::1 and rankfed-coordinator; devices
# edge-1 edge-2 edge-3; operator "operator". Writes OUT_DIR/ca.pem (+ ca.key),
# server.pem/server.key, NAME.pem/NAME.key per device and operator. Keys are EC P-256,
# mode 0600. An existing CA in OUT_DIR is reused, so more devices can be added later.
# For production, issue these from your own CA; this script is for test federations.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage 0 ;; esac
out="$1"; shift
servers=(); devices=(); operators=(); days=365
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server-name) servers+=("$2"); shift 2 ;;
    --device) devices+=("$2"); shift 2 ;;
    --operator) operators+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "make-certs.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ ${#servers[@]} -gt 0 ]] || servers=(localhost 127.0.0.1 ::1 rankfed-coordinator)
[[ ${#devices[@]} -gt 0 ]] || devices=(edge-1 edge-2 edge-3)
[[ ${#operators[@]} -gt 0 ]] || operators=(operator)
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required" >&2; exit 1; }

mkdir -p "$out"
umask 077
cd "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -f ca.pem || ! -f ca.key ]]; then
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days $((days * 10)) -subj "/O=RankFed/CN=RankFed test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
fi

# sign NAME SUBJECT EXTFILE
sign() {
  local name="$1" subject="$2" ext="$3"
  newkey "$name.key"
  openssl req -new -key "$name.key" -subj "$subject" -out "$tmp/$name.csr"
  openssl x509 -req -in "$tmp/$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile "$ext" -out "$name.pem" 2>/dev/null
}

san=""
for name in "${servers[@]}"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
  "${san%,}" > "$tmp/server.ext"
sign server "/O=RankFed/CN=${servers[0]}" "$tmp/server.ext"

for name in "${devices[@]}"; do
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:%s\n' \
    "$name" > "$tmp/$name.ext"
  sign "$name" "/O=RankFed/OU=devices/CN=$name" "$tmp/$name.ext"
done
for name in "${operators[@]}"; do
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$tmp/$name.ext"
  sign "$name" "/O=RankFed/OU=operators/CN=$name" "$tmp/$name.ext"
done
chmod 0644 ./*.pem
echo "make-certs.sh: wrote CA, server (${servers[*]}), devices (${devices[*]}), operators (${operators[*]}) to $(pwd)"
