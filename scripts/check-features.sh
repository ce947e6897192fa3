#!/usr/bin/env bash
# One dependency feature set: every dependency of the `tessera` binary is resolved with the same
# features when the whole workspace is built (the benchmark and the end-to-end tests included),
# so `cargo build --release --workspace` after `cargo build --release -p tessera-cli` compiles
# only what the binary does not use instead of the shared tree again.
#
# Compares, per package, the feature sets `cargo tree` resolves for the two builds (normal and
# build dependencies, as `cargo build` resolves them; host and target copies both count) and
# prints the packages that differ, with `cargo tree -i` commands that show who turns what on.
# The usual fix is to declare the feature in the root Cargo.toml's [workspace.dependencies].
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C

features() {
    # "name vX.Y.Z feature,feature" per line; `(*)` marks repeats, proc macros are tagged.
    cargo tree --locked -e normal,build --prefix none -f '{p} {f}' "$@" \
        | sed -e 's/ (\*)$//' -e 's/ (proc-macro)//' | sort -u
}

binary=$(features -p tessera-cli)
workspace=$(features --workspace)

# "name version<TAB> [features] [features]": the feature sets of each copy of a package.
by_package() {
    awk '{ k = $1 " " $2; a[k] = a[k] " [" substr($0, length(k) + 2) "]" }
         END { for (k in a) print k "\t" a[k] }' | sort
}

# Packages of the binary's build whose feature sets differ in the workspace build.
differ=$(join -t $'\t' <(by_package <<<"$binary") <(by_package <<<"$workspace") | awk -F'\t' '$2 != $3')

if [ -n "$differ" ]; then
    echo "dependencies built with other features for the workspace than for tessera-cli:" >&2
    while IFS=$'\t' read -r pkg bin ws; do
        printf '  %s\n    tessera-cli:%s\n    workspace:  %s\n' "$pkg" "$bin" "$ws" >&2
        printf '    see: cargo tree -e features --workspace -i %s\n' "${pkg%% *}@${pkg##* v}" >&2
    done <<<"$differ"
    exit 1
fi
echo "one feature set: the $(by_package <<<"$binary" | wc -l) packages tessera-cli builds have the same features in the workspace build"
