//! What the contracts ([`tessera_mesh::contracts`]) say about each method, as far as the
//! client cares: may it be retried, and is its request a single message (so it can be
//! buffered and sent again). A table of its own so the per-call lookup copies three flags.

use std::{collections::HashMap, sync::OnceLock};

use tessera_mesh::contracts::Contracts;

use crate::Error;

/// The retry-relevant facts about one method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MethodInfo {
    /// `idempotency_level` is NO_SIDE_EFFECTS or IDEMPOTENT.
    pub(crate) idempotent: bool,
    /// The request is a stream of messages (never buffered, never retried).
    pub(crate) client_streaming: bool,
    /// The response is a stream of messages (no default deadline: it may be long-lived).
    pub(crate) server_streaming: bool,
}

/// Methods by HTTP/2 path, `/tessera.posts.v1.PostService/GetPost`.
#[derive(Debug, Default)]
pub(crate) struct MethodTable {
    by_path: HashMap<Box<str>, MethodInfo>,
}

impl MethodTable {
    /// The facts of every method in `contracts`.
    pub(crate) fn from_contracts(contracts: &Contracts) -> Self {
        let by_path = contracts
            .methods()
            .map(|m| {
                let info = MethodInfo {
                    idempotent: m.idempotent,
                    client_streaming: m.client_streaming,
                    server_streaming: m.server_streaming,
                };
                (m.path.as_str().into(), info)
            })
            .collect();
        Self { by_path }
    }

    /// The table for Tessera's own contracts, decoded once per process.
    pub(crate) fn tessera() -> Result<&'static Self, Error> {
        static TABLE: OnceLock<MethodTable> = OnceLock::new();
        let contracts = Contracts::tessera().map_err(Error::Descriptor)?;
        Ok(TABLE.get_or_init(|| Self::from_contracts(contracts)))
    }

    /// The method at `path`, if the contracts define it.
    pub(crate) fn get(&self, path: &str) -> Option<MethodInfo> {
        self.by_path.get(path).copied()
    }

    /// Paths of the methods that may be retried, sorted.
    #[cfg(test)]
    fn idempotent_paths(&self) -> Vec<&str> {
        let mut paths: Vec<&str> = self
            .by_path
            .iter()
            .filter(|(_, m)| m.idempotent)
            .map(|(p, _)| &**p)
            .collect();
        paths.sort_unstable();
        paths
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_idempotency_from_the_contracts() {
        let table = MethodTable::tessera().unwrap();
        let get = table.get("/tessera.posts.v1.PostService/GetPost").unwrap();
        assert!(get.idempotent && !get.client_streaming && !get.server_streaming);
        let watch = table
            .get("/tessera.posts.v1.PostService/WatchEvents")
            .unwrap();
        assert!(watch.idempotent && watch.server_streaming && !watch.client_streaming);
        let create = table
            .get("/tessera.posts.v1.PostService/CreatePost")
            .unwrap();
        assert!(!create.idempotent);
        assert!(
            !table
                .get("/tessera.users.v1.UserService/Login")
                .unwrap()
                .idempotent
        );
        assert!(table.get("/tessera.posts.v1.PostService/Nope").is_none());
        let paths = table.idempotent_paths();
        assert!(paths.contains(&"/tessera.users.v1.UserService/DeleteUser"));
        assert!(
            paths.contains(&"/tessera.notifications.v1.NotificationService/SubscribeNotifications")
        );
        assert!(!paths.iter().any(|p| p.ends_with("/CreateComment")));
    }
}
