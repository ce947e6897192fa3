//! The Kubernetes base (`k8s/base`) has the shape docs/deploy.md describes: per service a
//! ServiceAccount, a headless Service, a hardened Deployment with gRPC probes and resource
//! bounds, a PodDisruptionBudget and a HorizontalPodAutoscaler; and a default-deny
//! NetworkPolicy. Schemas, checkov and hadolint are scripts/check-manifests.sh's job; this
//! checks what those cannot know, and needs no tools beyond cargo, except for the renders:
//! dev and production under an overlay that adds nothing but another namespace (every id,
//! name and target must follow it) and their egress rules, with the kubectl that
//! scripts/check-manifests.sh installs (skipped, saying so, without it).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;

/// The workloads k8s/base deploys: every registered one that `tessera up` always runs. An
/// optional workload (examples/digest) is the component `k8s/components/<name>`, deployed by
/// the overlay `k8s/overlays/with-<name>` on top of dev.
fn deployed() -> Vec<&'static str> {
    tessera_cli::workloads::WORKLOADS
        .iter()
        .filter(|w| !w.optional)
        .map(|w| w.name)
        .collect()
}

fn optional() -> Vec<&'static str> {
    tessera_cli::workloads::WORKLOADS
        .iter()
        .filter(|w| w.optional)
        .map(|w| w.name)
        .collect()
}

/// What an overlay deploys: the base's workloads, and for `with-<name>` that one too.
fn deployed_by(overlay: &str) -> Vec<&'static str> {
    let mut workloads = deployed();
    workloads.extend(
        optional()
            .into_iter()
            .filter(|name| overlay.strip_prefix("with-") == Some(name)),
    );
    workloads
}

/// The workloads someone calls, so every deployment must give their callers a target.
fn called() -> Vec<&'static str> {
    let workloads = tessera_cli::workloads::WORKLOADS;
    workloads
        .iter()
        .map(|w| w.name)
        .filter(|name| {
            workloads
                .iter()
                .any(|w| w.upstreams.iter().any(|u| u.name == *name))
        })
        .collect()
}
/// The plaintext admin port the gRPC health service listens on.
const ADMIN_PORT: i64 = 9090;
/// 5 s for endpoints to drop the pod plus up to 20 s for calls in flight.
const MIN_GRACE_SECONDS: i64 = 25;

/// One document of a manifest file.
struct Object {
    file: String,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        str_at(&self.doc, &["kind"]).unwrap_or_default()
    }

    fn name(&self) -> &str {
        str_at(&self.doc, &["metadata", "name"]).unwrap_or_default()
    }

    fn is(&self, kind: &str, name: &str) -> bool {
        self.kind() == kind && self.name() == name
    }
}

fn base_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base")
}

/// Every `*.yaml` file of k8s/base, by file name, sorted.
fn base_files() -> Vec<(String, String)> {
    yaml_files(&base_dir())
}

/// Every `*.yaml` file of `dir`, by file name, sorted.
fn yaml_files(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, text)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml in {}", dir.display());
    files
}

/// Every non-empty document of every file.
fn parse(files: &[(String, String)]) -> Vec<Object> {
    let mut objects = Vec::new();
    for (file, text) in files {
        for document in serde_norway::Deserializer::from_str(text) {
            let doc = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
            if !doc.is_null() {
                objects.push(Object {
                    file: file.clone(),
                    doc,
                });
            }
        }
    }
    objects
}

fn load_base() -> Vec<Object> {
    parse(&base_files())
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(*key))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

fn at_mut<'a>(value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(value, |value, key| value.get_mut(*key))
}

/// Whether every `key: value` of `selector` is among `labels` (an empty selector selects all).
fn selects(selector: Option<&Value>, labels: Option<&Value>) -> bool {
    let Some(selector) = selector.and_then(Value::as_mapping) else {
        return false;
    };
    selector
        .iter()
        .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

/// What is wrong with the Deployment of `service`, each line naming the service.
fn deployment_problems(objects: &[Object], service: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let deployments: Vec<&Object> = objects
        .iter()
        .filter(|o| o.is("Deployment", service))
        .collect();
    let [deployment] = deployments.as_slice() else {
        return vec![format!(
            "{service}: expected one Deployment named {service}, found {}",
            deployments.len()
        )];
    };
    let mut missing = |what: &str| problems.push(format!("{service}: Deployment {what}"));
    let doc = &deployment.doc;
    let Some(pod) = at(doc, &["spec", "template", "spec"]) else {
        missing("has no spec.template.spec");
        return problems;
    };

    match str_at(pod, &["serviceAccountName"]) {
        Some(account) if account == service => {
            if !objects.iter().any(|o| o.is("ServiceAccount", service)) {
                missing(&format!(
                    "runs as ServiceAccount {service}, which does not exist"
                ));
            }
        }
        Some(other) => missing(&format!("has serviceAccountName {other}, not {service}")),
        None => missing("has no serviceAccountName"),
    }

    match at(pod, &["terminationGracePeriodSeconds"]).and_then(Value::as_i64) {
        Some(seconds) if seconds >= MIN_GRACE_SECONDS => {}
        Some(seconds) => missing(&format!(
            "has terminationGracePeriodSeconds {seconds}, less than {MIN_GRACE_SECONDS}"
        )),
        None => missing("has no terminationGracePeriodSeconds"),
    }

    let container = at(pod, &["containers"])
        .and_then(Value::as_sequence)
        .and_then(|containers| {
            containers
                .iter()
                .find(|c| str_at(c, &["name"]) == Some(service))
        });
    let Some(container) = container else {
        missing(&format!("has no container named {service}"));
        return problems;
    };

    let args: Option<Vec<&str>> = at(container, &["args"])
        .and_then(Value::as_sequence)
        .and_then(|args| args.iter().map(Value::as_str).collect());
    match args {
        Some(args) if args == ["serve", service] => {}
        Some(args) => missing(&format!(
            "container args are {args:?}, not [\"serve\", \"{service}\"]"
        )),
        None => missing(&format!(
            "container has no args (want [\"serve\", \"{service}\"])"
        )),
    }

    for (probe, health) in [
        ("readinessProbe", "readiness"),
        ("livenessProbe", "liveness"),
    ] {
        let Some(grpc) = at(container, &[probe, "grpc"]) else {
            missing(&format!("container has no {probe} of type grpc"));
            continue;
        };
        if at(grpc, &["port"]).and_then(Value::as_i64) != Some(ADMIN_PORT) {
            missing(&format!("{probe} is not on port {ADMIN_PORT}"));
        }
        if str_at(grpc, &["service"]) != Some(health) {
            missing(&format!("{probe} does not ask for service {health}"));
        }
    }
    if at(container, &["startupProbe"])
        .and_then(Value::as_mapping)
        .is_none()
    {
        missing("container has no startupProbe");
    }

    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            let value = at(container, &["resources", bound, resource]);
            if !value.is_some_and(|v| v.is_string() || v.is_number()) {
                missing(&format!("container has no resources.{bound}.{resource}"));
            }
        }
    }

    let security = |path: &[&str]| at(container, &[&["securityContext"], path].concat());
    let flag = |key: &str| security(&[key]).and_then(Value::as_bool);
    if flag("runAsNonRoot") != Some(true) {
        missing("container securityContext lacks runAsNonRoot: true");
    }
    if flag("readOnlyRootFilesystem") != Some(true) {
        missing("container securityContext lacks readOnlyRootFilesystem: true");
    }
    if flag("allowPrivilegeEscalation") != Some(false) {
        missing("container securityContext lacks allowPrivilegeEscalation: false");
    }
    let drops_all = security(&["capabilities", "drop"])
        .and_then(Value::as_sequence)
        .is_some_and(|drop| drop.iter().any(|c| c.as_str() == Some("ALL")));
    if !drops_all {
        missing("container securityContext lacks capabilities.drop: [ALL]");
    }
    // The container's setting, if any, overrides the pod's.
    let seccomp = str_at(container, &["securityContext", "seccompProfile", "type"])
        .or_else(|| str_at(pod, &["securityContext", "seccompProfile", "type"]));
    if seccomp != Some("RuntimeDefault") {
        missing("has no seccompProfile RuntimeDefault (pod or container securityContext)");
    }
    problems
}

/// What is wrong with the Service, PodDisruptionBudget and HorizontalPodAutoscaler of `service`.
fn companion_problems(objects: &[Object], service: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let pod_labels = objects
        .iter()
        .find(|o| o.is("Deployment", service))
        .and_then(|d| at(&d.doc, &["spec", "template", "metadata", "labels"]));

    let headless: Vec<&Object> = objects
        .iter()
        .filter(|o| o.is("Service", service))
        .filter(|o| str_at(&o.doc, &["spec", "clusterIP"]) == Some("None"))
        .collect();
    match headless.as_slice() {
        [svc] => {
            if !selects(at(&svc.doc, &["spec", "selector"]), pod_labels) {
                problems.push(format!(
                    "{service}: the headless Service does not select the Deployment's pods"
                ));
            }
        }
        found => problems.push(format!(
            "{service}: expected one headless Service {service} (clusterIP: None), found {}",
            found.len()
        )),
    }

    let pdbs = objects
        .iter()
        .filter(|o| o.kind() == "PodDisruptionBudget")
        .filter(|o| selects(at(&o.doc, &["spec", "selector", "matchLabels"]), pod_labels))
        .count();
    if pdbs != 1 {
        problems.push(format!(
            "{service}: expected one PodDisruptionBudget selecting its pods, found {pdbs}"
        ));
    }

    let hpas = objects
        .iter()
        .filter(|o| o.kind() == "HorizontalPodAutoscaler")
        .filter(|o| {
            let target = at(&o.doc, &["spec", "scaleTargetRef"]);
            target.and_then(|t| str_at(t, &["kind"])) == Some("Deployment")
                && target.and_then(|t| str_at(t, &["name"])) == Some(service)
        })
        .count();
    if hpas != 1 {
        problems.push(format!(
            "{service}: expected one HorizontalPodAutoscaler targeting Deployment {service}, found {hpas}"
        ));
    }
    problems
}

/// A NetworkPolicy selecting every pod, for ingress and egress, allowing nothing.
fn is_default_deny(policy: &Object) -> bool {
    let spec = at(&policy.doc, &["spec"]);
    let selects_all = spec
        .and_then(|s| at(s, &["podSelector"]))
        .and_then(Value::as_mapping)
        .is_some_and(|selector| {
            selector.values().all(|v| {
                v.is_null()
                    || v.as_mapping().is_some_and(|m| m.is_empty())
                    || v.as_sequence().is_some_and(|s| s.is_empty())
            })
        });
    let types: Vec<&str> = spec
        .and_then(|s| at(s, &["policyTypes"]))
        .and_then(Value::as_sequence)
        .map(|types| types.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let allows_nothing = |rules: &str| {
        spec.and_then(|s| at(s, &[rules]))
            .is_none_or(|r| r.is_null() || r.as_sequence().is_some_and(|r| r.is_empty()))
    };
    policy.kind() == "NetworkPolicy"
        && selects_all
        && types.contains(&"Ingress")
        && types.contains(&"Egress")
        && allows_nothing("ingress")
        && allows_nothing("egress")
}

fn default_deny_problems(objects: &[Object]) -> Vec<String> {
    if objects.iter().any(is_default_deny) {
        Vec::new()
    } else {
        vec![
            "no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)"
                .to_owned(),
        ]
    }
}

fn all_problems(objects: &[Object]) -> Vec<String> {
    let mut problems: Vec<String> = deployed()
        .iter()
        .flat_map(|service| {
            let mut p = deployment_problems(objects, service);
            p.extend(companion_problems(objects, service));
            p
        })
        .collect();
    problems.extend(default_deny_problems(objects));
    problems
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "k8s/base is missing:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_service_has_a_hardened_deployment_with_grpc_probes() {
    let objects = load_base();
    let problems: Vec<String> = deployed()
        .iter()
        .flat_map(|service| deployment_problems(&objects, service))
        .collect();
    assert_no_problems(&problems);
}

#[test]
fn every_service_has_a_headless_service_a_pdb_and_an_hpa() {
    let objects = load_base();
    let problems: Vec<String> = deployed()
        .iter()
        .flat_map(|service| companion_problems(&objects, service))
        .collect();
    assert_no_problems(&problems);
}

/// An optional workload ships as a component with the same shape as the base services, and
/// the overlay `with-<name>` deploys it in dev's manner (its image, one replica).
#[test]
fn every_optional_workload_has_a_component_shaped_like_the_base() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s");
    for name in optional() {
        let dir = root.join("components").join(name);
        let files: Vec<(String, String)> = yaml_files(&dir)
            .into_iter()
            .map(|(file, text)| (format!("components/{name}/{file}"), text))
            .collect();
        let objects = parse(&files);
        let mut problems = deployment_problems(&objects, name);
        problems.extend(companion_problems(&objects, name));
        assert_no_problems(&problems);
        let kustomization = objects
            .iter()
            .find(|o| o.file.ends_with("/kustomization.yaml"))
            .unwrap_or_else(|| panic!("k8s/components/{name} has no kustomization.yaml"));
        assert_eq!(kustomization.kind(), "Component", "k8s/components/{name}");
        let resources = at(&kustomization.doc, &["resources"])
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for (file, _) in &files {
            let file = file.rsplit('/').next().unwrap_or_default();
            assert!(
                file == "kustomization.yaml" || resources.iter().any(|r| r.as_str() == Some(file)),
                "k8s/components/{name}/{file} is not a resource of its kustomization"
            );
        }
        let overlay = root.join("overlays").join(format!("with-{name}"));
        let text = std::fs::read_to_string(overlay.join("kustomization.yaml"))
            .unwrap_or_else(|e| panic!("{}: {e}", overlay.display()));
        assert!(
            text.contains(&format!("../../components/{name}")),
            "k8s/overlays/with-{name} does not use its component"
        );
    }
}

/// The rendered `with-<name>` overlay: dev plus the workload, in dev's image and replica
/// count, and the default (dev) render without it.
#[test]
fn an_optional_workload_is_deployed_only_by_its_overlay() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: no kubectl (scripts/check-manifests.sh installs one)");
        return;
    };
    for name in optional() {
        let dev = render_in_namespace(&kubectl, "dev", "shop");
        assert!(!dev.iter().any(|o| o.name() == name), "dev deploys {name}");
        let with = render_in_namespace(&kubectl, &format!("with-{name}"), "shop");
        assert_eq!(
            with.len(),
            dev.len() + 5,
            "{name}: SA, Service, Deployment, PDB, HPA"
        );
        let deployment = with.iter().find(|o| o.is("Deployment", name)).unwrap();
        let container = at(&deployment.doc, &["spec", "template", "spec", "containers"])
            .and_then(|c| c.get(0))
            .unwrap();
        assert_eq!(str_at(container, &["image"]), Some("tessera:dev"));
        assert_eq!(
            str_at(container, &["imagePullPolicy"]),
            Some("IfNotPresent")
        );
        let hpa = with
            .iter()
            .find(|o| o.is("HorizontalPodAutoscaler", name))
            .unwrap();
        assert_eq!(
            at(&hpa.doc, &["spec", "maxReplicas"]).and_then(Value::as_i64),
            Some(1)
        );
    }
}

#[test]
fn the_namespace_denies_all_traffic_by_default() {
    assert_no_problems(&default_deny_problems(&load_base()));
}

/// The checks above read the files; kustomize deploys only what the kustomization lists.
#[test]
fn every_manifest_in_base_is_a_kustomize_resource() {
    let objects = load_base();
    let kustomization = objects
        .iter()
        .find(|o| o.file == "kustomization.yaml")
        .expect("k8s/base/kustomization.yaml");
    let resources: Vec<&str> = at(&kustomization.doc, &["resources"])
        .and_then(Value::as_sequence)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (file, _) in base_files() {
        if file != "kustomization.yaml" {
            assert!(
                resources.contains(&file.as_str()),
                "k8s/base/{file} is not listed in k8s/base/kustomization.yaml resources"
            );
        }
    }
}

/// The checks fail, naming the service and the gap, when a manifest loses what they check.
#[test]
fn the_checks_name_the_service_and_what_is_missing() {
    let mut objects = load_base();
    assert_no_problems(&all_problems(&objects));

    let posts = objects
        .iter_mut()
        .find(|o| o.is("Deployment", "posts"))
        .unwrap();
    let container = at_mut(&mut posts.doc, &["spec", "template", "spec", "containers"])
        .and_then(|c| c.get_mut(0))
        .unwrap();
    let c = container.as_mapping_mut().unwrap();
    c.remove("readinessProbe");
    c.insert(
        "args".into(),
        Value::Sequence(vec!["serve".into(), "users".into()]),
    );
    let security = container.get_mut("securityContext").unwrap();
    *security.get_mut("readOnlyRootFilesystem").unwrap() = Value::Bool(false);
    security.as_mapping_mut().unwrap().remove("capabilities");
    at_mut(container, &["resources", "limits"])
        .and_then(Value::as_mapping_mut)
        .unwrap()
        .remove("memory");
    objects.retain(|o| !o.is("HorizontalPodAutoscaler", "gateway"));
    objects.retain(|o| !(o.kind() == "NetworkPolicy" && o.name() == "default-deny"));

    let problems = all_problems(&objects);
    for expected in [
        "posts: Deployment container has no readinessProbe of type grpc",
        "posts: Deployment container args are [\"serve\", \"users\"], not [\"serve\", \"posts\"]",
        "posts: Deployment container securityContext lacks readOnlyRootFilesystem: true",
        "posts: Deployment container securityContext lacks capabilities.drop: [ALL]",
        "posts: Deployment container has no resources.limits.memory",
        "gateway: expected one HorizontalPodAutoscaler targeting Deployment gateway, found 0",
        "no default-deny NetworkPolicy",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "expected a problem {expected:?}, got {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 7, "unexpected problems: {problems:#?}");
}

/// kubectl from scripts/check-manifests.sh's tool directory, or on PATH; None (the test
/// then says it is skipped) on a machine without it.
fn kubectl() -> Option<PathBuf> {
    let tools = std::env::var_os("TESSERA_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("tessera/manifest-tools"))
        });
    let candidates = tools.map(|t| t.join("bin/kubectl")).into_iter().chain(
        std::env::var_os("PATH").into_iter().flat_map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("kubectl"))
                .collect::<Vec<_>>()
        }),
    );
    candidates.into_iter().find(|p| p.is_file())
}

/// `kubectl kustomize` of a kustomization that is `resources: [overlay]` plus `namespace`.
fn render_in_namespace(kubectl: &Path, overlay: &str, namespace: &str) -> Vec<Object> {
    let overlay_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/overlays")
        .join(overlay)
        .canonicalize()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix(&format!("tessera-k8s-{overlay}-{namespace}-"))
        .tempdir()
        .unwrap();
    let tmp = dir.path().canonicalize().unwrap();
    // kustomize takes resources only by relative path.
    let up = "../".repeat(tmp.components().count() - 1);
    let relative = format!(
        "{up}{}",
        overlay_dir.to_string_lossy().trim_start_matches('/')
    );
    std::fs::write(
        tmp.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {namespace}\nresources:\n  - {relative}\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(&tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: kustomize renders in well under a second; give it a minute on a busy machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("kubectl kustomize {} did not finish in 60 s", tmp.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    drop(dir);
    assert!(
        out.status.success(),
        "kubectl kustomize ({overlay} in {namespace}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&[(
        format!("{overlay}+namespace {namespace}"),
        String::from_utf8(out.stdout).unwrap(),
    )])
}

/// Every string in `value` with its path, for looking for namespace literals.
fn strings<'a>(value: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) => out.push((path, s)),
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map {
                let key = key.as_str().unwrap_or("?");
                strings(item, format!("{path}.{key}"), out);
            }
        }
        Value::Tagged(tagged) => strings(&tagged.value, path, out),
        _ => {}
    }
}

/// Standard base64 (a Secret's `data`), ignoring padding; enough for a test.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// What would break if `objects` (rendered for `namespace`) were applied there.
fn namespace_problems(objects: &[Object], namespace: &str, workloads: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let services: Vec<&str> = objects
        .iter()
        .filter(|o| o.kind() == "Service")
        .map(Object::name)
        .collect();
    let cluster_scoped = [
        "Namespace",
        "ClusterIssuer",
        "ClusterRole",
        "ClusterRoleBinding",
    ];
    for object in objects {
        let what = format!("{} {}", object.kind(), object.name());
        if object.kind() == "Namespace" {
            if object.name() != namespace {
                problems.push(format!("{what}: a Namespace other than {namespace}"));
            }
        } else if !cluster_scoped.contains(&object.kind())
            && str_at(&object.doc, &["metadata", "namespace"]) != Some(namespace)
        {
            problems.push(format!("{what}: not in namespace {namespace}"));
        }
        // No other namespace spelled anywhere: not in DNS names, SPIFFE ids, selectors.
        let mut found = Vec::new();
        strings(&object.doc, String::new(), &mut found);
        for (path, text) in found {
            let spells_tessera = namespace != "tessera"
                && (text.contains("/ns/tessera/")
                    || text.contains(".tessera.svc")
                    || (path.ends_with("kubernetes.io/metadata.name") && text == "tessera"));
            let elsewhere = path.ends_with(".namespace") && text != namespace;
            if spells_tessera || elsewhere || text.contains(".svc.cluster.local") {
                problems.push(format!("{what}: {path} names a namespace: {text:?}"));
            }
        }
    }

    let config = objects
        .iter()
        .find(|o| o.kind() == "ConfigMap" && o.name().starts_with("tessera-config"));
    let Some(config) = config else {
        return vec!["no ConfigMap tessera-config rendered".into()];
    };
    for service in called() {
        let key = format!("TESSERA_{}_TARGET", service.to_ascii_uppercase());
        match str_at(&config.doc, &["data", &key]) {
            // A short name: resolved through the pod's DNS search path, in its namespace.
            Some(target) if target == format!("dns:{service}:8443") => {}
            other => problems.push(format!(
                "{key} is {other:?}, expected the short name dns:{service}:8443"
            )),
        }
        if workloads.contains(&service) && !services.contains(&service) {
            problems.push(format!("{key}: no Service {service} is rendered"));
        }
    }

    for &service in workloads {
        let Some(deployment) = objects.iter().find(|o| o.is("Deployment", service)) else {
            problems.push(format!("{service}: no Deployment"));
            continue;
        };
        let pod = at(&deployment.doc, &["spec", "template", "spec"]).unwrap();
        // The identity the pod gets (csi-driver-spiffe: its own namespace and ServiceAccount)
        // must be the one `tessera serve` expects (TESSERA_NAMESPACE and the service name).
        if str_at(pod, &["serviceAccountName"]) != Some(service) {
            problems.push(format!("{service}: serviceAccountName is not {service}"));
        }
        let container = at(pod, &["containers"]).and_then(|c| c.get(0)).unwrap();
        let args: Vec<&str> = at(container, &["args"])
            .and_then(Value::as_sequence)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if args != ["serve", service] {
            problems.push(format!("{service}: args {args:?}"));
        }
        let env = at(container, &["env"])
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        let from_namespace = env.iter().any(|e| {
            str_at(e, &["name"]) == Some("TESSERA_NAMESPACE")
                && str_at(e, &["valueFrom", "fieldRef", "fieldPath"]) == Some("metadata.namespace")
        });
        if !from_namespace {
            problems.push(format!(
                "{service}: TESSERA_NAMESPACE does not come from metadata.namespace"
            ));
        }
        let tls_is_spiffe_csi = at(pod, &["volumes"])
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .any(|v| {
                str_at(v, &["name"]) == Some("tls")
                    && str_at(v, &["csi", "driver"]) == Some("spiffe.csi.cert-manager.io")
            });
        if !tls_is_spiffe_csi {
            problems.push(format!(
                "{service}: the tls volume is not issued per pod by csi-driver-spiffe"
            ));
        }
    }

    // Every Issuer a Certificate names is rendered into the same namespace.
    for cert in objects.iter().filter(|o| o.kind() == "Certificate") {
        let kind = str_at(&cert.doc, &["spec", "issuerRef", "kind"]).unwrap_or("Issuer");
        let name = str_at(&cert.doc, &["spec", "issuerRef", "name"]).unwrap_or_default();
        if kind == "Issuer" && !objects.iter().any(|o| o.is("Issuer", name)) {
            problems.push(format!(
                "Certificate {}: Issuer {name} is not rendered",
                cert.name()
            ));
        }
    }
    // Database URLs name Services of this namespace by short name, or something outside it.
    for secret in objects.iter().filter(|o| o.kind() == "Secret") {
        let Some(data) = at(&secret.doc, &["data"]).and_then(Value::as_mapping) else {
            continue;
        };
        for (key, value) in data {
            if key.as_str() != Some("DATABASE_URL") {
                continue;
            }
            let url = String::from_utf8_lossy(&base64_decode(value.as_str().unwrap_or_default()))
                .into_owned();
            let host = url
                .split('@')
                .nth(1)
                .and_then(|rest| rest.split([':', '/']).next())
                .unwrap_or_default();
            if !services.contains(&host) {
                problems.push(format!(
                    "Secret {}: DATABASE_URL host {host:?} is not a Service rendered here",
                    secret.name()
                ));
            }
        }
    }
    problems
}

#[test]
fn dev_and_production_deploy_into_any_namespace() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: no kubectl (scripts/check-manifests.sh installs one)");
        return;
    };
    for overlay in ["dev", "production", "dev-observability", "with-digest"] {
        for namespace in ["shop", "tessera-staging"] {
            let objects = render_in_namespace(&kubectl, overlay, namespace);
            let problems = namespace_problems(&objects, namespace, &deployed_by(overlay));
            assert!(
                problems.is_empty(),
                "{overlay} in namespace {namespace}:\n{}",
                problems.join("\n")
            );
        }
    }
}

#[test]
fn the_namespace_check_finds_a_namespace_literal() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: no kubectl (scripts/check-manifests.sh installs one)");
        return;
    };
    // Rendered for `tessera` but checked as if for `shop`: everything is out of place.
    let objects = render_in_namespace(&kubectl, "dev", "tessera");
    let problems = namespace_problems(&objects, "shop", &deployed());
    assert!(
        problems.iter().any(|p| p.contains("not in namespace shop")),
        "{problems:?}"
    );
    let mut objects = render_in_namespace(&kubectl, "dev", "shop");
    let config = objects
        .iter_mut()
        .find(|o| o.kind() == "ConfigMap" && o.name().starts_with("tessera-config"))
        .unwrap();
    let target = at_mut(&mut config.doc, &["data", "TESSERA_POSTS_TARGET"]).unwrap();
    *target = Value::String("dns:posts.tessera.svc.cluster.local:8443".into());
    let problems = namespace_problems(&objects, "shop", &deployed());
    assert!(
        problems.iter().any(|p| p.contains("TESSERA_POSTS_TARGET")),
        "{problems:?}"
    );
}

#[test]
fn egress_reaches_dns_caches_and_only_a_set_database_range() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: no kubectl (scripts/check-manifests.sh installs one)");
        return;
    };
    for overlay in ["dev", "production"] {
        let objects = render_in_namespace(&kubectl, overlay, "shop");
        let dns = objects
            .iter()
            .find(|o| o.is("NetworkPolicy", "allow-dns-egress"))
            .unwrap();
        let mut found = Vec::new();
        strings(&dns.doc, String::new(), &mut found);
        // kube-dns (CoreDNS) pods, and NodeLocal DNSCache's default link-local address.
        assert!(found.iter().any(|(_, s)| *s == "kube-dns"), "{overlay}");
        assert!(
            found.iter().any(|(_, s)| *s == "169.254.20.10/32"),
            "{overlay}"
        );
        // Nothing opens egress to the whole internet.
        for object in &objects {
            let mut found = Vec::new();
            strings(&object.doc, String::new(), &mut found);
            for (path, text) in found {
                assert!(
                    !(path.ends_with(".cidr") && (text == "0.0.0.0/0" || text == "::/0")),
                    "{overlay}: {} {}: {path} = {text}",
                    object.kind(),
                    object.name()
                );
            }
        }
    }
    let production = render_in_namespace(&kubectl, "production", "shop");
    let database = production
        .iter()
        .find(|o| o.is("NetworkPolicy", "allow-database-egress"))
        .unwrap();
    let mut found = Vec::new();
    strings(&database.doc, String::new(), &mut found);
    let cidrs: Vec<&str> = found
        .iter()
        .filter(|(p, _)| p.ends_with(".cidr"))
        .map(|(_, s)| *s)
        .collect();
    // The placeholder (TEST-NET-1, routes nowhere) until the user sets their range.
    assert_eq!(cidrs, ["192.0.2.0/24"]);
}
