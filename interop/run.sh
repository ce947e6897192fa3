#!/usr/bin/env bash
# Runs the Python grpcio interop tests (interop/test_interop.py) against `tessera up`.
#
# Installs interop/requirements.txt into a virtualenv outside the repository
# ($TESSERA_INTEROP_VENV, default ~/.cache/tessera/interop-venv), again only when the
# requirements change. Builds nothing: the binary is $TESSERA (default target/debug/tessera,
# from the repository root) and must exist. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${TESSERA_INTEROP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/interop-venv}"

fail() {
  printf 'interop: %s\n' "$*" >&2
  exit 1
}

TESSERA="${TESSERA:-target/debug/tessera}"
[[ -x $TESSERA ]] || fail "no tessera binary at $TESSERA (cargo build -p tessera-cli, or set TESSERA)"
TESSERA="$(cd "$(dirname "$TESSERA")" && pwd)/$(basename "$TESSERA")"
export TESSERA

stamp="$VENV/requirements.txt"
if [[ ! -x $VENV/bin/python || ! -f $stamp ]] || ! cmp -s interop/requirements.txt "$stamp"; then
  printf '==> installing interop/requirements.txt into %s\n' "$VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r interop/requirements.txt
  cp interop/requirements.txt "$stamp"
fi

printf '==> pytest interop (tessera: %s)\n' "$TESSERA"
rc=0
"$VENV/bin/python" -m pytest interop -p no:cacheprovider -ra "$@" || rc=$?
case $rc in
  0) ;;
  5) fail "pytest collected no tests" ;;
  *) fail "pytest failed (exit $rc)" ;;
esac
