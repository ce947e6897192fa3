//! Access rules, read from the contracts: the `(tessera.mesh.v1.access)` method option and the
//! standard `idempotency_level`, decoded from the descriptor set at start-up.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use tessera::mesh::v1::AccessRule;

// prost drops unknown fields, so the generated `prost_types::MethodOptions` loses the
// extension. These mirrors decode just the parts of descriptor.proto the policy needs, with
// the extension as an ordinary field at its number.
#[derive(Clone, PartialEq, Message)]
struct FileSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<File>,
}

#[derive(Clone, PartialEq, Message)]
struct File {
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDesc>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceDesc {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    method: Vec<MethodDesc>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodDesc {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, optional, tag = "4")]
    options: Option<MethodOpts>,
    #[prost(bool, optional, tag = "6")]
    server_streaming: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodOpts {
    #[prost(int32, optional, tag = "34")]
    idempotency_level: Option<i32>,
    #[prost(message, optional, tag = "50001")]
    access: Option<AccessRule>,
}

/// What the contract says about one method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodRule {
    /// `/tessera.posts.v1.PostService/CreatePost`
    pub path: String,
    /// `tessera.posts.v1.PostService`
    pub service: String,
    /// `CreatePost`
    pub method: String,
    /// The workload that serves it: the second package segment (`posts`).
    pub owner: String,
    /// Workload names allowed to call it on the internal port.
    pub callers: BTreeSet<String>,
    /// Served through the gateway's public port.
    pub public: bool,
    /// An end-user token is required.
    pub user: bool,
    /// `NO_SIDE_EFFECTS` or `IDEMPOTENT`: safe to retry.
    pub idempotent: bool,
    /// The method carries an access rule at all (without one only the owner may call it).
    pub has_rule: bool,
    pub server_streaming: bool,
}

/// Every method's rule, keyed by gRPC path.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    methods: BTreeMap<String, MethodRule>,
}

/// The owning workload of a package `tessera.<name>.v1`.
fn owner_of(package: &str) -> String {
    package.split('.').nth(1).unwrap_or(package).to_owned()
}

impl Policy {
    /// Decodes a serialized `FileDescriptorSet`.
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        let set = FileSet::decode(bytes)?;
        let mut methods = BTreeMap::new();
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for svc in file.service {
                let svc_name = svc.name.unwrap_or_default();
                let service = if package.is_empty() {
                    svc_name
                } else {
                    format!("{package}.{svc_name}")
                };
                for m in svc.method {
                    let method = m.name.unwrap_or_default();
                    let opts = m.options.unwrap_or_default();
                    // descriptor.proto: NO_SIDE_EFFECTS = 1, IDEMPOTENT = 2.
                    let idempotent = matches!(opts.idempotency_level, Some(1 | 2));
                    let has_rule = opts.access.is_some();
                    let rule = opts.access.unwrap_or_default();
                    let path = format!("/{service}/{method}");
                    methods.insert(
                        path.clone(),
                        MethodRule {
                            path,
                            service: service.clone(),
                            method,
                            owner: owner_of(&package),
                            callers: rule.callers.into_iter().collect(),
                            public: rule.public,
                            user: rule.user,
                            idempotent,
                            has_rule,
                            server_streaming: m.server_streaming.unwrap_or(false),
                        },
                    );
                }
            }
        }
        Ok(Self { methods })
    }

    /// The rules of Tessera's own contracts.
    pub fn contracts() -> Self {
        // The descriptor set is produced by build.rs from the same protos the code is
        // generated from; failing to decode it is a build defect, caught by every test.
        Self::from_descriptor_set(tessera::FILE_DESCRIPTOR_SET).unwrap_or_default()
    }

    pub fn rule(&self, path: &str) -> Option<&MethodRule> {
        self.methods.get(path)
    }

    /// Every method, ordered by path.
    pub fn methods(&self) -> impl Iterator<Item = &MethodRule> {
        self.methods.values()
    }

    /// The methods a workload serves.
    pub fn methods_of<'a>(&'a self, owner: &'a str) -> impl Iterator<Item = &'a MethodRule> {
        self.methods().filter(move |m| m.owner == owner)
    }

    /// The workloads that serve at least one method, ordered.
    pub fn owners(&self) -> BTreeSet<String> {
        self.methods().map(|m| m.owner.clone()).collect()
    }

    /// Which workloads each workload may call: caller → callees.
    pub fn call_graph(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for m in self.methods() {
            for caller in &m.callers {
                if *caller != m.owner {
                    graph
                        .entry(caller.clone())
                        .or_default()
                        .insert(m.owner.clone());
                }
            }
        }
        graph
    }

    /// The access matrix as an aligned text table.
    pub fn matrix(&self) -> String {
        let rows: Vec<[String; 5]> = self
            .methods()
            .map(|m| {
                let callers = if m.has_rule {
                    m.callers.iter().cloned().collect::<Vec<_>>().join(",")
                } else {
                    "(none: owner only)".into()
                };
                [
                    m.path.clone(),
                    if callers.is_empty() {
                        "-".into()
                    } else {
                        callers
                    },
                    yes_no(m.public),
                    yes_no(m.user),
                    yes_no(m.idempotent),
                ]
            })
            .collect();
        let header = ["METHOD", "CALLERS", "PUBLIC", "USER TOKEN", "IDEMPOTENT"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_rules_from_the_contracts() {
        let p = Policy::contracts();
        let create = p.rule("/tessera.posts.v1.PostService/CreatePost").unwrap();
        assert!(create.has_rule && create.public && create.user && !create.idempotent);
        assert_eq!(create.owner, "posts");
        assert!(create.callers.contains("gateway"));
        let get = p.rule("/tessera.posts.v1.PostService/GetPost").unwrap();
        assert!(get.idempotent && !get.user);
        assert!(get.callers.contains("comments"));
        let watch = p.rule("/tessera.users.v1.UserService/WatchEvents").unwrap();
        assert!(!watch.public && watch.server_streaming);
        // Every RPC in the contracts carries a rule.
        assert!(p.methods().all(|m| m.has_rule), "{}", p.matrix());
        // The five, and any workload added beside them (its contract names it the owner).
        let owners = p.owners();
        for five in crate::config::SERVICES {
            assert!(owners.contains(five), "{five}: {owners:?}");
        }
        assert!(
            !owners.contains("mesh") && !owners.contains("api"),
            "{owners:?}"
        );
        assert!(p.call_graph()["comments"].contains("posts"));
        assert!(
            p.matrix()
                .contains("/tessera.gateway.v1.FeedService/GetPostThread")
        );
    }
}

/// The internal mTLS port every workload listens on in Kubernetes.
pub const K8S_GRPC_PORT: u16 = 8443;
/// The gateway's public port in Kubernetes.
pub const K8S_PUBLIC_PORT: u16 = 8080;

/// The Kubernetes NetworkPolicies that admit exactly the calls the contracts allow: for each
/// workload an ingress allow from its callers (plus the public port for the gateway), and for
/// each caller an egress allow to its callees. Layered over the default-deny in `k8s/base`;
/// `k8s/base/networkpolicies-generated.yaml` is this output, and a test keeps them equal.
pub fn network_policies(policy: &Policy) -> String {
    let mut callers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for owner in policy.owners() {
        callers.entry(owner).or_default();
    }
    for m in policy.methods() {
        callers
            .entry(m.owner.clone())
            .or_default()
            .extend(m.callers.iter().cloned());
    }
    let peer = |key: &str, names: &BTreeSet<String>| {
        let mut lines = vec![
            format!("    - {key}:"),
            "        - podSelector:".to_owned(),
            "            matchExpressions:".to_owned(),
            "              - key: app.kubernetes.io/name".to_owned(),
            "                operator: In".to_owned(),
            "                values:".to_owned(),
        ];
        lines.extend(names.iter().map(|n| format!("                  - {n}")));
        lines
    };
    let ports = |opens_rule: bool, port: u16| {
        vec![
            if opens_rule {
                "    - ports:".to_owned()
            } else {
                "      ports:".to_owned()
            },
            "        - protocol: TCP".to_owned(),
            format!("          port: {port}"),
        ]
    };
    let head = |name: &str, workload: &str, kind: &str| {
        vec![
            "---".to_owned(),
            "apiVersion: networking.k8s.io/v1".to_owned(),
            "kind: NetworkPolicy".to_owned(),
            "metadata:".to_owned(),
            format!("  name: {name}"),
            "  labels:".to_owned(),
            "    app.kubernetes.io/managed-by: tessera-policy".to_owned(),
            "spec:".to_owned(),
            "  podSelector:".to_owned(),
            "    matchLabels:".to_owned(),
            format!("      app.kubernetes.io/name: {workload}"),
            "  policyTypes:".to_owned(),
            format!("    - {kind}"),
        ]
    };
    let mut lines: Vec<String> = Vec::new();
    for (service, from) in &callers {
        let mut rules = Vec::new();
        if !from.is_empty() {
            rules.extend(peer("from", from));
            rules.extend(ports(false, K8S_GRPC_PORT));
        }
        if service == "gateway" {
            rules.extend(ports(true, K8S_PUBLIC_PORT));
        }
        lines.extend(head(&format!("allow-to-{service}"), service, "Ingress"));
        if rules.is_empty() {
            lines.push("  ingress: []".to_owned());
        } else {
            lines.push("  ingress:".to_owned());
            lines.extend(rules);
        }
    }
    let mut callees: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (service, from) in &callers {
        for caller in from {
            callees
                .entry(caller.clone())
                .or_default()
                .insert(service.clone());
        }
    }
    for (caller, to) in &callees {
        lines.extend(head(&format!("allow-from-{caller}"), caller, "Egress"));
        lines.push("  egress:".to_owned());
        lines.extend(peer("to", to));
        lines.extend(ports(false, K8S_GRPC_PORT));
    }
    format!(
        "# Generated by tessera policy --netpol; do not edit.\n{}\n",
        lines.join("\n")
    )
}

#[cfg(test)]
mod netpol_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn k8s_network_policies_match_the_contracts() {
        let generated = network_policies(&Policy::contracts());
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../k8s/base/networkpolicies-generated.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap();
        assert!(
            committed == generated,
            "k8s/base/networkpolicies-generated.yaml drifted from the contracts; regenerate it with \
             `cargo run -p tessera-cli -- policy --netpol > k8s/base/networkpolicies-generated.yaml`"
        );
        assert!(generated.contains("name: allow-from-comments"));
    }
}
