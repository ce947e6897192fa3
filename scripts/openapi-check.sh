#!/usr/bin/env bash
# Validates the OpenAPI document of the public HTTP/JSON API with openapi-spec-validator.
#
# The document comes from the binary's `tessera openapi` (the same bytes the gateway serves at
# /openapi.json). Builds nothing: the binary is $TESSERA (default target/debug/tessera, from
# the repository root); openapi-spec-validator must be importable by python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TESSERA="${TESSERA:-target/debug/tessera}"
fail() {
  printf 'openapi-check: %s\n' "$*" >&2
  exit 1
}
[[ -x $TESSERA ]] || fail "no tessera binary at $TESSERA (cargo build -p tessera-cli, or set TESSERA)"
python3 -c 'import openapi_spec_validator' 2>/dev/null ||
  fail "openapi-spec-validator is not installed (python3 -m pip install openapi-spec-validator)"

doc="$(mktemp --suffix=.json)"
trap 'rm -f "$doc"' EXIT
"$TESSERA" openapi >"$doc"
python3 -m openapi_spec_validator "$doc"
paths=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["paths"]))' "$doc")
printf 'openapi-check: valid OpenAPI 3 document, %s paths\n' "$paths"
