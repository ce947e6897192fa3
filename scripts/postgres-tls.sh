#!/usr/bin/env bash
# A second local PostgreSQL cluster that speaks TLS only, with a server certificate from a
# CA of its own (not a public root), for the tests of TESSERA_DATABASE_CA / sslrootcert
# with sslmode=verify-full. Idempotent; needs root and postgresql-common (pg_createcluster),
# which .ci/run installs with PostgreSQL.
#
# Prints, for eval:
#   export TESSERA_TEST_DATABASE_TLS_URL=postgres://tessera:tessera@localhost:<port>/tessera_test
#   export TESSERA_TEST_DATABASE_TLS_CA=<ca.crt>
# The certificate names DNS localhost only, so verify-full to 127.0.0.1 fails by design. The
# role tessera may also log in by password over the local socket (/var/run/postgresql).
#
# Remove it with: pg_dropcluster --stop <version> tessera_tls
set -euo pipefail

NAME=tessera_tls
version=$(pg_lsclusters --no-header | awk 'NR==1 {print $1}')
[[ -n "$version" ]] || { echo "postgres-tls: no PostgreSQL cluster to take the version from" >&2; exit 1; }
conf="/etc/postgresql/$version/$NAME"

if ! pg_lsclusters --no-header | awk '{print $2}' | grep -qx "$NAME"; then
  pg_createcluster "$version" "$NAME" >/dev/null
  tls="$conf/tls"
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=tessera test database CA" -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 3650 -extfile <(printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n') \
    -out "$tls/server.crt" 2>/dev/null
  chown -R postgres:postgres "$tls"
  chmod 0600 "$tls/server.key" "$tls/ca.key"
  chmod 0644 "$tls/ca.crt"
  # TLS on, and only TLS from TCP clients (hostssl; no plain host line).
  cat >>"$conf/postgresql.conf" <<EOF
listen_addresses = 'localhost'
ssl = on
ssl_cert_file = '$tls/server.crt'
ssl_key_file = '$tls/server.key'
EOF
  # Local socket: the role tessera by password (scripts/image-check.sh connects through it
  # from inside a chroot, as uid 65532), everyone else as their own OS user.
  cat >"$conf/pg_hba.conf" <<'EOF'
local   all tessera             scram-sha-256
local   all all                 peer
hostssl all all 127.0.0.1/32    scram-sha-256
hostssl all all ::1/128         scram-sha-256
EOF
fi
pg_ctlcluster "$version" "$NAME" start >/dev/null 2>&1 || true
port=$(pg_lsclusters --no-header | awk -v n="$NAME" '$2 == n {print $3}')
su postgres -c "psql -p $port -qc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tessera') THEN CREATE ROLE tessera LOGIN SUPERUSER PASSWORD 'tessera'; END IF; END \\\$\\\$;\"" >&2
su postgres -c "psql -p $port -tAc \"SELECT 1 FROM pg_database WHERE datname = 'tessera_test'\"" | grep -q 1 ||
  su postgres -c "createdb -p $port -O tessera tessera_test" >&2
printf 'export TESSERA_TEST_DATABASE_TLS_URL=%q\n' "postgres://tessera:tessera@localhost:$port/tessera_test"
printf 'export TESSERA_TEST_DATABASE_TLS_CA=%q\n' "$conf/tls/ca.crt"
