//! Access rules, as the contracts declare them (the `(tessera.mesh.v1.access)` method option
//! and the standard `idempotency_level`, read by [`crate::contracts`]): who may call what, and
//! the access matrix `tessera policy` prints.

use std::collections::{BTreeMap, BTreeSet};

use crate::contracts::Contracts;

/// What the contract says about one method ([`crate::contracts::Method`]).
pub type MethodRule = crate::contracts::Method;

/// Every method's rule, keyed by gRPC path.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    methods: BTreeMap<String, MethodRule>,
}

impl Policy {
    /// The rules of the methods in `contracts`.
    pub fn from_contracts(contracts: &Contracts) -> Self {
        let methods = contracts
            .methods()
            .map(|m| (m.path.clone(), m.clone()))
            .collect();
        Self { methods }
    }

    /// The rules of Tessera's own contracts.
    pub fn contracts() -> Self {
        // Failing to decode the compiled-in set is a build defect, caught by every test.
        Contracts::tessera()
            .map(Self::from_contracts)
            .unwrap_or_default()
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
