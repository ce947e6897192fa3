#!/usr/bin/env bash
# The runtime image, assembled and run as the Deployments run it; no Docker engine needed.
#
#   1. builds the Dockerfile's own final stage with buildah (vfs storage, chroot isolation),
#      taking the runtime tree from the build context (--build-arg BINARY=prebuilt) instead of
#      the musl builder stage: out/ holds the binary CI built ($TESSERA), passwd/group, /tmp,
#      and, because CI's binary links glibc dynamically and the final stage is `scratch`, the
#      dynamic loader and the shared libraries it names (ldd), at the paths the binary asks for;
#   2. exports it as an OCI layout (buildah push) and unpacks it (umoci unpack);
#   3. renders k8s/overlays/dev (or $IMAGE_CHECK_OVERLAY) and, for every Deployment, runs the
#      image's entrypoint with the container's args in a network and mount namespace of its
#      own (a pod's: its own loopback, so the fixed ports of every service do not collide and
#      nothing listens outside this machine), under chroot --userspec of the pod's
#      runAsUser:runAsGroup, with exactly the container's environment (envFrom ConfigMaps,
#      env values, the downward-API namespace and pod name), its volume mounts (emptyDir as
#      empty writable directories; the certificate volume filled by `tessera certs`, mode and
#      group as the kubelet makes them with fsGroup, read-only) and a read-only root;
#   4. checks the startup and readiness probes' gRPC health services with the image's own
#      `tessera probe`, stops the pod with SIGTERM and requires a clean exit within the grace
#      period; every log line must be JSON with unique keys and none may be at ERROR.
#
# DATABASE_URL from the dev overlay's Secrets names the in-cluster PostgreSQL, which does not
# exist here. With TESSERA_TEST_DATABASE_TLS_URL set (scripts/postgres-tls.sh, as CI does),
# it is replaced by a database of that local cluster per service, reached through its Unix
# socket (bind-mounted, since the pod has no network to the host), and the check requires
# the service's migrations there afterwards; without it, DATABASE_URL is left out (SQLite in
# the data emptyDir) and the check says so.
#
# Needs root (namespaces, mounts, chroot). Installs buildah and umoci from Debian when
# missing. Uses kubectl from scripts/check-manifests.sh's tool directory. Prints step times.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${TESSERA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/manifest-tools}"
OVERLAY="${IMAGE_CHECK_OVERLAY:-k8s/overlays/dev}"
BINARY="${TESSERA:-$ROOT/target/release/tessera}"

step_start=0
step() {
  step_start=$SECONDS
  printf '==> %s\n' "$*"
}
done_step() {
  printf '    ok (%ss)\n' "$((SECONDS - step_start))"
}
fail() {
  printf 'image-check: %s\n' "$*" >&2
  exit 1
}

[[ $EUID -eq 0 ]] || fail "needs root (network and mount namespaces, chroot)"
[[ -x "$BINARY" ]] || fail "no binary at $BINARY (set TESSERA)"
[[ -x "$TOOLS/bin/kubectl" ]] || fail "no kubectl in $TOOLS; run scripts/check-manifests.sh first"

missing=()
for tool in buildah:buildah umoci:umoci openssl:openssl ip:iproute2 unshare:util-linux readelf:binutils; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  step "installing ${missing[*]} (Debian)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  done_step
fi

WORK="$(mktemp -d)"
cleanup() {
  # The image store holds files owned by other uids; buildah removes its own containers.
  buildah --storage-driver vfs --root "$WORK/storage" --runroot "$WORK/run" rmi --all >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$ROOT"

step "build context: out/ from $BINARY"
ctx="$WORK/context"
out="$ctx/out"
install -D -m 0755 "$BINARY" "$out/usr/local/bin/tessera"
mkdir -p "$out/etc" "$out/tmp"
chmod 1777 "$out/tmp"
printf 'nonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >"$out/etc/passwd"
printf 'nonroot:x:65532:\n' >"$out/etc/group"
interp="$(readelf -W -l "$BINARY" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
if [[ -n "$interp" ]]; then
  # Dynamically linked (glibc): the loader at the path the binary names, the libraries at
  # the paths ldd resolves them to (the loader's default search path).
  printf '    dynamically linked (%s): copying the loader and libraries\n' "$interp"
  install -D -m 0755 "$(readlink -f "$interp")" "$out$interp"
  while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$out$lib"
    printf '    %s\n' "$lib"
  done < <(ldd "$BINARY" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
else
  printf '    statically linked\n'
fi
done_step

step "buildah: the Dockerfile's final stage (--build-arg BINARY=prebuilt)"
bah=(buildah --storage-driver vfs --root "$WORK/storage" --runroot "$WORK/run")
# Docker format keeps the HEALTHCHECK (OCI image configs have no field for it).
"${bah[@]}" bud --quiet --isolation chroot --layers=false --format docker \
  --build-arg BINARY=prebuilt --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -f "$ROOT/Dockerfile" -t localhost/tessera:check "$ctx" >/dev/null ||
  fail "buildah could not build the final stage"
"${bah[@]}" push --quiet localhost/tessera:check "oci:$WORK/oci:check" >/dev/null ||
  fail "buildah could not export the image"
done_step

step "umoci unpack"
umoci unpack --image "$WORK/oci:check" "$WORK/bundle" >/dev/null || fail "umoci unpack failed"
rootfs="$WORK/bundle/rootfs"
[[ -x "$rootfs/usr/local/bin/tessera" ]] || fail "the image has no /usr/local/bin/tessera"
"$TOOLS/bin/python" - "$WORK/bundle/config.json" <<'EOF'
import json, sys
process = json.load(open(sys.argv[1]))["process"]
print(f"    image user {process['user']['uid']}:{process['user']['gid']}, entrypoint {process['args']}")
EOF
done_step

step "kubectl kustomize $OVERLAY"
"$TOOLS/bin/kubectl" kustomize "$OVERLAY" >"$WORK/render.yaml" || fail "kustomize $OVERLAY failed"
done_step

step "tessera certs for the rendered identities"
# The trust domain comes from the rendered ConfigMap; the namespace is the pods' own.
"$TOOLS/bin/python" - "$WORK/render.yaml" >"$WORK/identity" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
domain = next((d["data"]["TESSERA_TRUST_DOMAIN"] for d in docs
               if d["kind"] == "ConfigMap" and "TESSERA_TRUST_DOMAIN" in d.get("data", {})),
              "tessera.local")
namespaces = {d["metadata"].get("namespace", "default") for d in docs if d["kind"] == "Deployment"}
assert len(namespaces) == 1, f"Deployments in several namespaces: {namespaces}"
print(domain, namespaces.pop())
EOF
read -r trust_domain namespace <"$WORK/identity"
"$BINARY" certs --dir "$WORK/certs" --trust-domain "$trust_domain" --namespace "$namespace" 2>&1 |
  sed 's/^/    /'
done_step

step "a public CA and certificates for the rendered Certificates' DNS names (openssl)"
# What cert-manager would write into each Certificate's Secret (the gateway's public one):
# tls.crt and tls.key for its dnsNames, from a CA of this run, so clients can be checked to
# verify the public name against that CA.
"$TOOLS/bin/python" - "$WORK/render.yaml" >"$WORK/public-certs" <<'EOF'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Certificate" and d["spec"].get("dnsNames"):
        print(d["spec"]["secretName"], ",".join(d["spec"]["dnsNames"]))
EOF
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=image-check public CA" -keyout "$WORK/public-ca.key" -out "$WORK/public-ca.crt" 2>/dev/null
while read -r secret names; do
  dir="$WORK/secrets/$secret"
  mkdir -p "$dir"
  san="$(printf 'DNS:%s,' ${names//,/ })"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=${names%%,*}" \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
  openssl x509 -req -in "$dir/tls.csr" -CA "$WORK/public-ca.crt" -CAkey "$WORK/public-ca.key" \
    -CAcreateserial -days 2 -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "${san%,}") \
    -out "$dir/tls.crt" 2>/dev/null
  cp "$WORK/public-ca.crt" "$dir/ca.crt"
  printf '    Secret %s: %s\n' "$secret" "$names"
done <"$WORK/public-certs"
done_step

pg_port=""
if [[ -n ${TESSERA_TEST_DATABASE_TLS_URL:-} ]]; then
  pg_port="${TESSERA_TEST_DATABASE_TLS_URL##*:}"
  pg_port="${pg_port%%/*}"
  step "a database per service on the local PostgreSQL (port $pg_port, Unix socket)"
  for db in users posts comments notifications; do
    su postgres -c "dropdb -p $pg_port --if-exists imagecheck_$db 2>/dev/null; createdb -p $pg_port -O tessera imagecheck_$db" ||
      fail "cannot create database imagecheck_$db"
  done
  drop_databases() {
    for db in users posts comments notifications; do
      su postgres -c "dropdb -p $pg_port --if-exists imagecheck_$db 2>/dev/null" || true
    done
  }
  trap 'drop_databases; cleanup' EXIT
  done_step
fi

step "every Deployment, run from the image as the pod runs it"
PG_PORT="$pg_port" "$TOOLS/bin/python" - "$WORK" "$rootfs" <<'EOF' || fail "a service did not run from the image as its Deployment says"
import base64, json, os, shutil, subprocess, sys, time

import yaml

work, rootfs = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(f"{work}/render.yaml")) if d]
by_kind = lambda kind: {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
config_maps, secrets = by_kind("ConfigMap"), by_kind("Secret")
image = json.load(open(f"{work}/bundle/config.json"))["process"]
image_env = dict(e.split("=", 1) for e in image.get("env", []))
failures = []
checked_public = []
PG_PORT = os.environ.get("PG_PORT", "")
uses_postgres = set()


def secret_value(name, key):
    secret = secrets.get(name)
    if secret is None:
        return None
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    if key in secret.get("data", {}):
        return base64.b64decode(secret["data"][key]).decode()
    return None


def pod_env(deployment, container):
    """The container's environment as the kubelet builds it (image env, envFrom, env)."""
    name = deployment["metadata"]["name"]
    pod_name = f"{name}-check"
    env = dict(image_env)
    env["HOSTNAME"] = pod_name
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            cm = config_maps.get(ref["name"])
            if cm is None:
                raise SystemExit(f"{name}: envFrom ConfigMap {ref['name']} is not rendered")
            env.update(cm.get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values = {
                "metadata.namespace": deployment["metadata"].get("namespace", "default"),
                "metadata.name": pod_name,
                "spec.serviceAccountName": deployment["spec"]["template"]["spec"].get("serviceAccountName", "default"),
            }
            if field not in values:
                raise SystemExit(f"{name}: fieldRef {field} is not simulated here")
            env[var["name"]] = values[field]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = config_maps.get(ref["name"], {}).get("data", {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise SystemExit(f"{name}: ConfigMap {ref['name']} key {ref['key']} is not rendered")
            env[var["name"]] = value
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secret_value(ref["name"], ref["key"])
            if var["name"] == "DATABASE_URL":
                if PG_PORT:
                    env[var["name"]] = (f"postgres://tessera:tessera@localhost/imagecheck_{name}"
                                        f"?host=/var/run/postgresql&port={PG_PORT}")
                    uses_postgres.add(name)
                else:
                    print(f"    {name}: DATABASE_URL from Secret {ref['name']} left out (no PostgreSQL here; SQLite)")
                continue
            if value is None:
                if ref.get("optional"):
                    continue
                raise SystemExit(f"{name}: Secret {ref['name']} key {ref['key']} is not rendered")
            env[var["name"]] = value
        else:
            raise SystemExit(f"{name}: env {var['name']}: unsupported source {source}")
    return env


def probe_of(container, kind):
    probe = container.get(kind, {}).get("grpc")
    if probe is None:
        raise SystemExit(f"{container['name']}: no gRPC {kind}")
    return probe["port"], probe.get("service", "")


def run_pod(deployment):
    name = deployment["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    fs_group = pod_sc.get("fsGroup")
    assert uid and gid, f"{name}: no runAsUser/runAsGroup"
    assert sc.get("readOnlyRootFilesystem"), f"{name}: root filesystem not read-only"
    env = pod_env(deployment, container)
    argv = container.get("command") or image.get("args", [])[:1]
    argv = argv + container.get("args", [])

    pod = f"{work}/pods/{name}"
    os.makedirs(pod)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = []  # (source, target inside the rootfs, read-only)
    for m in container.get("volumeMounts", []):
        volume = volumes[m["name"]]
        source = f"{pod}/volume-{m['name']}"
        os.makedirs(source)
        if "emptyDir" in volume:
            os.chmod(source, 0o777)  # the kubelet's emptyDir mode
        elif "secret" in volume and volume["secret"].get("secretName") in secrets:
            # A Secret the overlay renders (the users key-encryption key): its keys as files.
            rendered = secrets[volume["secret"]["secretName"]]
            mode = volume["secret"].get("defaultMode", 0o644)
            data = {k: base64.b64decode(v) for k, v in rendered.get("data", {}).items()}
            data.update({k: v.encode() for k, v in rendered.get("stringData", {}).items()})
            for key, value in data.items():
                with open(f"{source}/{key}", "wb") as f:
                    f.write(value)
                os.chown(f"{source}/{key}", 0, fs_group if fs_group is not None else 0)
                os.chmod(f"{source}/{key}", mode)
        elif "secret" in volume or "csi" in volume:
            # A Certificate's Secret (the public one), or else the workload identity
            # (csi-driver-spiffe, cert-manager's layout); owned root:fsGroup.
            secret = volume.get("secret", {}).get("secretName", "")
            certs = f"{work}/secrets/{secret}"
            if not secret or not os.path.isdir(certs):
                certs = f"{work}/certs/{name}"
            mode = volume.get("secret", {}).get("defaultMode", 0o644)
            for f in ("tls.crt", "tls.key", "ca.crt"):
                shutil.copy(f"{certs}/{f}", f"{source}/{f}")
                os.chown(f"{source}/{f}", 0, fs_group if fs_group is not None else 0)
                os.chmod(f"{source}/{f}", mode)
        else:
            raise SystemExit(f"{name}: volume {m['name']}: type not simulated here")
        mounts.append((source, m["mountPath"], bool(m.get("readOnly"))))
    # Every other service needs users' signing keys to be ready (readiness waits for them), so
    # its pod gets a users of its own from the same image: on ::1 (the pod under check holds
    # 0.0.0.0:8443), found as `users` through the pod's hosts file, with users' certificate.
    helper = name != "users"
    if helper:
        for d in ("helper-tls", "helper-data"):
            os.makedirs(f"{pod}/{d}")
            os.chown(f"{pod}/{d}", uid, gid)
        os.chmod(f"{pod}/helper-data", 0o700)
        for f in ("tls.crt", "tls.key", "ca.crt"):
            shutil.copy(f"{work}/certs/users/{f}", f"{pod}/helper-tls/{f}")
            os.chown(f"{pod}/helper-tls/{f}", uid, gid)
            os.chmod(f"{pod}/helper-tls/{f}", 0o400)
        mounts += [(f"{pod}/helper-tls", "/var/run/tessera/helper-tls", True),
                   (f"{pod}/helper-data", "/var/lib/tessera-helper", False)]
    # What the kubelet mounts into every container.
    with open(f"{pod}/hosts", "w") as f:
        f.write(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.0.1\t{name}-check\n")
        if helper:
            f.write("::1\tusers\n")
    with open(f"{pod}/resolv.conf", "w") as f:
        f.write(f"search {env.get('TESSERA_NAMESPACE', 'default')}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\n")
    mounts += [(f"{pod}/hosts", "/etc/hosts", True), (f"{pod}/resolv.conf", "/etc/resolv.conf", True)]
    if name in uses_postgres:
        # The database's Unix socket: the pod's stand-in for the in-cluster Service.
        mounts.append(("/var/run/postgresql", "/var/run/postgresql", False))

    startup, readiness = probe_of(container, "startupProbe"), probe_of(container, "readinessProbe")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    root = f"{pod}/root"
    lines = [
        "set -eu",
        "ip link set lo up",
        f"mkdir -p {root}",
        # A private copy of the mount of the rootfs, made read-only as the runtime does.
        f"mount --bind {rootfs} {root}",
        f"mount -o remount,bind,ro {root}",
    ]
    for source, target, ro in mounts:
        if not os.path.exists(rootfs + target):
            # The mount point; the unpacked rootfs is this run's own copy.
            if os.path.isdir(source):
                os.makedirs(rootfs + target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(rootfs + target), exist_ok=True)
                open(rootfs + target, "w").close()
        lines.append(f"mount --bind {source} {root}{target}")
        if ro:
            lines.append(f"mount -o remount,bind,ro {root}{target}")
    q = lambda s: "'" + s.replace("'", "'\\''") + "'"
    env_args = " ".join(q(f"{k}={v}") for k, v in sorted(env.items()))
    # The image has no env(1): chroot runs the entrypoint directly, env -i (from the host)
    # runs chroot with exactly the container's environment.
    run = f"env -i {env_args} chroot --userspec={uid}:{gid} {root}"
    if helper:
        helper_env = {
            "TESSERA_GRPC_ADDR": "[::1]:8443",
            "TESSERA_ADMIN_ADDR": "[::1]:19090",
            "TESSERA_TLS_DIR": "/var/run/tessera/helper-tls",
            "TESSERA_DATA_DIR": "/var/lib/tessera-helper",
            "TESSERA_LOG_FORMAT": "json",
        }
        for key in ("PATH", "TESSERA_TRUST_DOMAIN", "TESSERA_NAMESPACE"):
            if key in env:
                helper_env[key] = env[key]
        helper_args = " ".join(q(f"{k}={v}") for k, v in sorted(helper_env.items()))
        lines += [
            f"env -i {helper_args} chroot --userspec={uid}:{gid} {root} /usr/local/bin/tessera serve users >{pod}/helper.log 2>&1 &",
            "hpid=$!",
            "trap 'kill -KILL $hpid 2>/dev/null || true' EXIT",
        ]
    lines += [
        f"{run} {' '.join(q(a) for a in argv)} >{pod}/stdout 2>{pod}/stderr &",
        "pid=$!",
        "ok=",
        # Bounded: 60 tries, about 30 s, like the startupProbe's budget.
        "for i in $(seq 60); do",
        f"  if {run} /usr/local/bin/tessera probe --addr 127.0.0.1:{startup[0]} --service {q(startup[1])} >/dev/null 2>&1 &&",
        f"     {run} /usr/local/bin/tessera probe --addr 127.0.0.1:{readiness[0]} --service {q(readiness[1])} >/dev/null 2>&1; then ok=1; break; fi",
        "  kill -0 $pid 2>/dev/null || break",
        "  sleep 0.5",
        "done",
        f"echo \"uid $(awk '/^Uid:/ {{print $2}}' /proc/$pid/status 2>/dev/null)\" >{pod}/uid",
    ]
    public = next((p for p in container.get("ports", []) if p.get("name") == "public"), None)
    public_names = [line.split()[1].split(",") for line in open(f"{work}/public-certs")]
    if public and public_names and shutil.which("grpcurl"):
        # Internet clients verify the public name against the public issuer; the mesh CA
        # must not verify it (the mesh certificate is not what is served there).
        port, server_name = public["containerPort"], public_names[0][0]
        lines += [
            f"if [ -n \"$ok\" ]; then",
            f"  grpcurl -cacert {work}/public-ca.crt -servername {server_name} 127.0.0.1:{port} list >{pod}/public-list 2>&1 ||",
            f"    {{ echo 'public port: grpcurl with the public CA failed:'; cat {pod}/public-list; kill -KILL $pid; exit 5; }}",
            f"  ! grpcurl -cacert {work}/certs/ca.crt -servername {server_name} 127.0.0.1:{port} list >/dev/null 2>&1 ||",
            f"    {{ echo 'public port: the mesh CA verified it'; kill -KILL $pid; exit 6; }}",
            "fi",
        ]
        checked_public.append(name)
    elif public:
        print(f"    {name}: public port not checked (no grpcurl or no public Certificate)")
    lines += [
        "kill -TERM $pid 2>/dev/null || true",
        f"for i in $(seq {grace * 10}); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done",
        "kill -KILL $pid 2>/dev/null && { echo 'not stopped within the grace period'; exit 3; }",
        "wait $pid && code=0 || code=$?",
        "[ -n \"$ok\" ] || { echo 'never ready'; exit 2; }",
        "[ $code -eq 0 ] || { echo \"exit status $code after SIGTERM\"; exit 4; }",
    ]
    with open(f"{pod}/run.sh", "w") as f:
        f.write("\n".join(lines) + "\n")
    started = time.monotonic()
    result = subprocess.run(["unshare", "--net", "--mount", "--fork", "--", "sh", f"{pod}/run.sh"],
                            capture_output=True, text=True, timeout=grace + 60)
    elapsed = time.monotonic() - started
    problems = []
    if result.returncode != 0:
        problems.append(f"{result.stdout.strip()} {result.stderr.strip()} (status {result.returncode})")
    uid_seen = open(f"{pod}/uid").read().split()[-1:] if os.path.exists(f"{pod}/uid") else []
    if uid_seen != [str(uid)]:
        problems.append(f"ran as uid {uid_seen}, not {uid}")
    for stream in ("stdout", "stderr"):
        for n, line in enumerate(open(f"{pod}/{stream}", errors="replace"), 1):
            if not line.strip():
                continue
            if env.get("TESSERA_LOG_FORMAT") != "json":
                continue
            def unique(pairs):
                keys = [k for k, _ in pairs]
                dup = {k for k in keys if keys.count(k) > 1}
                if dup:
                    problems.append(f"{stream}:{n}: duplicate keys {sorted(dup)}: {line.strip()[:200]}")
                return dict(pairs)
            try:
                record = json.loads(line, object_pairs_hook=unique)
            except json.JSONDecodeError:
                problems.append(f"{stream}:{n}: not JSON: {line.strip()[:200]}")
                continue
            if str(record.get("level", "")).upper() == "ERROR":
                problems.append(f"{stream}:{n}: logged at ERROR: {line.strip()[:300]}")
    if name in uses_postgres:
        # The service ran its migrations in its PostgreSQL database, not in SQLite.
        migrated = subprocess.run(
            ["su", "postgres", "-c",
             f"psql -p {PG_PORT} -d imagecheck_{name} -tAc 'SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()'"],
            capture_output=True, text=True)
        tables = migrated.stdout.strip()
        if migrated.returncode != 0 or not tables.isdigit() or int(tables) == 0:
            problems.append(f"no tables in imagecheck_{name}: {migrated.stdout.strip()} {migrated.stderr.strip()}")
    if problems:
        failures.append(name)
        print(f"    {name}: FAILED after {elapsed:.1f}s")
        for p in problems:
            print(f"      {p}")
        for stream in ("stdout", "stderr", "helper.log"):
            if not os.path.exists(f"{pod}/{stream}"):
                continue
            tail = open(f"{pod}/{stream}", errors="replace").read().strip().splitlines()[-10:]
            for line in tail:
                print(f"      {stream}| {line[:300]}")
    else:
        extra = ", public port verified by its public name" if name in checked_public else ""
        extra += ", migrated its PostgreSQL database" if name in uses_postgres else ""
        print(f"    {name}: ready as uid {uid}, read-only root{extra}, stopped cleanly ({elapsed:.1f}s)")


deployments = [d for d in docs if d["kind"] == "Deployment"
               and d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "tessera"]
if not deployments:
    raise SystemExit("no Tessera Deployments rendered")
# IMAGE_CHECK_ONLY=posts,users runs only those Deployments (when debugging one).
only = os.environ.get("IMAGE_CHECK_ONLY")
for deployment in deployments:
    if only and deployment["metadata"]["name"] not in only.split(","):
        continue
    run_pod(deployment)
sys.exit(1 if failures else 0)
EOF
done_step

printf 'image-check: every service ran from the image (%ss)\n' "$SECONDS"
