#!/usr/bin/env bash
# Instructions per call of scenario A's servers, counted by valgrind's callgrind: the same
# figure on every run whatever else the machine does (CPU time on a shared VM moves by tens of
# percent between runs). Each server runs under callgrind; after a warm-up the counters are
# zeroed, `tessera-bench load` drives one call at a time for a while, and the counters are
# dumped. Counts are user-space only: the kernel's share (sockets, wakeups) is not in them.
#
#   bash scripts/callgrind.sh            # plain, mtls, mesh; about two minutes
#   SECS=20 bash scripts/callgrind.sh mesh mesh-no-otel
#   CONC=64 bash scripts/callgrind.sh    # 64 calls in flight instead of one
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
cargo build --release -p tessera-bench --bin tessera-bench
bench=target/release/tessera-bench
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(plain mtls mesh)
secs=${SECS:-10}
conc=${CONC:-1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

certs="$work/certs"
"$bench" certs --dir "$certs"

declare -A per_call
for mode in "${modes[@]}"; do
  out="$work/$mode"
  mkfifo "$out.in"
  valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
    "$bench" server --mode "$mode" --tls-dir "$certs/posts" \
    <"$out.in" >"$out.stdout" 2>"$out.stderr" &
  server=$!
  exec 3>"$out.in"
  for _ in $(seq 600); do
    grep -q '^listening' "$out.stdout" 2>/dev/null && break
    sleep 0.1
  done
  addr=$(awk '/^listening/ {print $2}' "$out.stdout")
  [ -n "$addr" ] || { echo "callgrind: $mode did not start" >&2; cat "$out.stderr" >&2; exit 1; }
  tls=(--tls-dir "$certs/gateway")
  [ "$mode" = plain ] && tls=()
  "$bench" load --addr "$addr" "${tls[@]}" --secs 3 >/dev/null
  callgrind_control -z "$server" >/dev/null 2>&1
  "$bench" load --addr "$addr" "${tls[@]}" --secs "$secs" --concurrency "$conc" >"$out.load"
  callgrind_control -d "$server" >/dev/null 2>&1
  exec 3>&-
  wait "$server" || true
  calls=$(awk '{print $2}' "$out.load")
  # The dump requested above is part 1; the file without a suffix is the exit's.
  instructions=$(awk '/^summary:/ {print $2; exit}' "$out.cg.1" 2>/dev/null || true)
  [ -n "$instructions" ] && [ "${calls:-0}" -gt 0 ] ||
    { echo "callgrind: no counts for $mode" >&2; exit 1; }
  per_call[$mode]=$((instructions / calls))
  echo "$mode: $calls calls, $((instructions / calls)) instructions per call ($(cat "$out.load"))"
done

if [ -n "${per_call[plain]:-}" ]; then
  for mode in "${modes[@]}"; do
    awk -v m="$mode" -v a="${per_call[$mode]}" -v b="${per_call[plain]}" \
      'BEGIN { printf "%-20s %8d instructions/call  %.2fx plain\n", m, a, a / b }'
  done
fi
