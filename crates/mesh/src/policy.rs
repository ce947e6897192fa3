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
    /// The contracts encoded, for reflection to describe.
    descriptor_set: std::sync::Arc<[u8]>,
}

impl Policy {
    /// The rules of the methods in `contracts`.
    pub fn from_contracts(contracts: &Contracts) -> Self {
        let methods = contracts
            .methods()
            .map(|m| (m.path.clone(), m.clone()))
            .collect();
        Self {
            methods,
            descriptor_set: contracts.encoded(),
        }
    }

    /// The encoded descriptor set the rules were read from; the internal port's reflection
    /// describes it.
    pub fn descriptor_set(&self) -> &[u8] {
        &self.descriptor_set
    }

    /// The rules of Tessera's own contracts.
    pub fn contracts() -> Self {
        // Failing to decode the compiled-in set is a build defect, caught by every test.
        Contracts::tessera()
            .map(Self::from_contracts)
            .unwrap_or_default()
    }

    /// The rule of the method at gRPC `path` (`/package.Service/Method`); `None` for a path
    /// no contract declares.
    pub fn rule(&self, path: &str) -> Option<&MethodRule> {
        self.methods.get(path)
    }

    /// Every method, ordered by path.
    pub fn methods(&self) -> impl Iterator<Item = &MethodRule> {
        self.methods.values()
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
