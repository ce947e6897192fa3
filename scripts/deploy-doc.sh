#!/usr/bin/env bash
# Runs the commands of docs/deploy.md that need no cluster, as they are written.
#
# They are not copied here: every ```sh block right after a line
# `<!-- ci: scripts/deploy-doc.sh runs this block -->` is read from docs/deploy.md and run
# with bash -euo pipefail, from the root of a copy of the repository's k8s/ and
# docs/ (so blocks may write there), with `tessera` ($TESSERA, default
# target/debug/tessera) and `kubectl` (scripts/check-manifests.sh's) on PATH. A block
# fails the script when any of its commands fails. Prints each block's time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${TESSERA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/manifest-tools}"
TESSERA="${TESSERA:-$ROOT/target/debug/tessera}"
MARKER='<!-- ci: scripts/deploy-doc.sh runs this block -->'

fail() {
  printf 'deploy-doc: %s\n' "$*" >&2
  exit 1
}
[[ -x $TESSERA ]] || fail "no tessera binary at $TESSERA (set TESSERA)"
[[ -x $TOOLS/bin/kubectl ]] || fail "no kubectl in $TOOLS; run scripts/check-manifests.sh first"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin" "$WORK/repo"
ln -s "$(cd "$(dirname "$TESSERA")" && pwd)/$(basename "$TESSERA")" "$WORK/bin/tessera"
ln -s "$TOOLS/bin/kubectl" "$WORK/bin/kubectl"
cp -r "$ROOT/k8s" "$ROOT/docs" "$WORK/repo/"

# Split the marked blocks into files block-1.sh, block-2.sh, ...
awk -v marker="$MARKER" -v dir="$WORK" '
  $0 == marker { armed = 1; next }
  armed && /^```sh$/ { n++; file = dir "/block-" n ".sh"; inside = 1; armed = 0; next }
  inside && /^```$/ { inside = 0; close(file); next }
  inside { print > file; next }
  armed && !/^[[:space:]]*$/ { printf "a marker is not followed by a ```sh block (line %d)\n", NR > "/dev/stderr"; bad = 1 }
  END { exit bad }
' "$ROOT/docs/deploy.md" || fail "docs/deploy.md: a marked block is malformed"

blocks=("$WORK"/block-*.sh)
[[ -e ${blocks[0]} ]] || fail "no marked blocks in docs/deploy.md"
for block in $(printf '%s\n' "${blocks[@]}" | sort -V); do
  start=$SECONDS
  printf '==> %s\n' "$(head -n 1 "$block")"
  (cd "$WORK/repo" && PATH="$WORK/bin:$PATH" bash -euo pipefail "$block") ||
    fail "this block of docs/deploy.md failed:$(printf '\n    %s' "$(cat "$block")")"
  printf '    ok (%ss)\n' "$((SECONDS - start))"
done
printf 'deploy-doc: %d blocks of docs/deploy.md ran (%ss)\n' "${#blocks[@]}" "$SECONDS"
