//! The one list of workloads the binary knows: what each serves, whom it calls, whether it
//! keeps a database or has a public port, and, for a workload beyond the five, how to start
//! it. `serve` (required targets, upstream channels), `up` (ports, certificates, databases,
//! the table), `certs` and the policy checks read it; adding a service is one entry here (plus
//! its contract under `proto/`, which is where its access rules and reflection come from).

use std::{future::Future, pin::Pin};

use tessera::{
    comments::v1::comment_service_server, digest::v1::digest_service_server,
    gateway::v1::feed_service_server, notifications::v1::notification_service_server,
    posts::v1::post_service_server, users::v1::user_service_server,
};
use tessera_client::Clients;
use tokio::sync::watch;
use tonic::service::Routes;

/// What a workload beyond the five gets to start with.
pub struct StartContext {
    /// Its database: a SQLite path or a `postgres://` URL (only for `database: true`).
    pub database: String,
    /// Typed clients of its upstreams (those without a target fail with FAILED_PRECONDITION).
    pub clients: Clients,
    /// The largest message its server decodes.
    pub max_message_size: usize,
    /// Turns `true` when the workload shuts down; background loops end on it.
    pub stop: watch::Receiver<bool>,
}

/// A started workload's routes; the mesh server wraps them (identity, rules, limits).
pub type StartFuture = Pin<Box<dyn Future<Output = anyhow::Result<Routes>> + Send>>;

/// How a workload beyond the five is started.
pub type StartFn = fn(StartContext) -> StartFuture;

/// One workload of the mesh.
#[derive(Clone, Copy)]
pub struct WorkloadSpec {
    /// The workload name: the SPIFFE id's service account and the contract's package
    /// (`tessera.<name>.v1`).
    pub name: &'static str,
    /// The gRPC service it serves, from the generated code's `NamedService::NAME`.
    pub served: &'static str,
    /// The workloads it calls: `serve` refuses to start without their `TESSERA_<NAME>_TARGET`.
    pub upstreams: &'static [&'static str],
    /// It keeps a database (`up` gives it one; on PostgreSQL its own).
    pub database: bool,
    /// The cursors of its event consumers in that database (`tessera cursor`).
    pub cursors: &'static [&'static str],
    /// It has the public port (the gateway).
    pub public: bool,
    /// `tessera up` runs it only when asked (`--with NAME`); `certs` always issues its
    /// certificate.
    pub optional: bool,
    /// How to start it; `None` for the five, whose wiring lives in `crate::wiring::start`.
    pub start: Option<StartFn>,
}

impl std::fmt::Debug for WorkloadSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSpec")
            .field("name", &self.name)
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

/// Every workload, in start order (each after its upstreams). `up` gives workload i (from 1)
/// the ports BASE+i and BASE+100+i.
pub const WORKLOADS: &[WorkloadSpec] = &[
    WorkloadSpec {
        name: "users",
        served: <user_service_server::UserServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &[],
        database: true,
        cursors: &[],
        public: false,
        optional: false,
        start: None,
    },
    WorkloadSpec {
        name: "posts",
        served: <post_service_server::PostServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &["users"],
        database: true,
        cursors: &[tessera_posts::USER_EVENTS_CURSOR],
        public: false,
        optional: false,
        start: None,
    },
    WorkloadSpec {
        name: "comments",
        served:
            <comment_service_server::CommentServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &["posts", "users"],
        database: true,
        cursors: &[
            tessera_comments::POST_EVENTS_CURSOR,
            tessera_comments::USER_EVENTS_CURSOR,
        ],
        public: false,
        optional: false,
        start: None,
    },
    WorkloadSpec {
        name: "notifications",
        served: <notification_service_server::NotificationServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &["comments", "users"],
        database: true,
        cursors: &[
            tessera_notifications::COMMENT_EVENTS_CURSOR,
            tessera_notifications::USER_EVENTS_CURSOR,
        ],
        public: false,
        optional: false,
        start: None,
    },
    WorkloadSpec {
        name: "gateway",
        served: <feed_service_server::FeedServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &["users", "posts", "comments", "notifications"],
        database: false,
        cursors: &[],
        public: true,
        optional: false,
        start: None,
    },
    // Another team's service (examples/digest): this entry is all the binary needs.
    WorkloadSpec {
        name: "digest",
        served:
            <digest_service_server::DigestServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &["posts", "notifications", "users"],
        database: true,
        cursors: &[tessera_example_digest::POST_EVENTS_CURSOR],
        public: false,
        optional: true,
        start: Some(start_digest),
    },
];

fn start_digest(ctx: StartContext) -> StartFuture {
    Box::pin(async move {
        let digest = tessera_example_digest::Digest::open(
            &ctx.database,
            ctx.clients.posts(),
            ctx.clients.notifications(),
        )
        .await?;
        tokio::spawn(tessera_example_digest::follow_post_events(
            digest.clone(),
            ctx.clients.channel("posts"),
            ctx.stop,
        ));
        Ok(Routes::new(
            digest_service_server::DigestServiceServer::new(digest)
                .max_decoding_message_size(ctx.max_message_size),
        ))
    })
}

/// The workload called `name`.
pub fn find(name: &str) -> Option<&'static WorkloadSpec> {
    WORKLOADS.iter().find(|w| w.name == name)
}

/// Its position in [`WORKLOADS`], from 1: `up`'s port offset.
pub fn port_offset(name: &str) -> Option<u16> {
    WORKLOADS
        .iter()
        .position(|w| w.name == name)
        .and_then(|i| u16::try_from(i + 1).ok())
}

/// The upstreams `service` calls, so `serve` can refuse to start without their targets.
pub fn upstreams(service: &str) -> &'static [&'static str] {
    find(service).map(|w| w.upstreams).unwrap_or_default()
}

/// The workloads that keep a database.
pub fn database_owners() -> impl Iterator<Item = &'static str> {
    WORKLOADS.iter().filter(|w| w.database).map(|w| w.name)
}

/// Every workload's name, in start order.
pub fn names() -> impl Iterator<Item = &'static str> {
    WORKLOADS.iter().map(|w| w.name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use tessera_mesh::policy::Policy;

    #[test]
    fn every_workload_serves_its_own_contract_and_calls_only_what_it_may() {
        let policy = Policy::contracts();
        let names: BTreeSet<&str> = names().collect();
        assert_eq!(names.len(), WORKLOADS.len(), "a name is registered twice");
        // Each workload serves the package named after it, so the rules read from the
        // contracts apply to it; and every contract with methods has a workload.
        for w in WORKLOADS {
            assert!(
                w.served.starts_with(&format!("tessera.{}.v1.", w.name)),
                "{} serves {}",
                w.name,
                w.served
            );
            assert!(
                policy.methods().any(|m| m.service == w.served),
                "{}: no contract defines {}",
                w.name,
                w.served
            );
        }
        for owner in policy.owners() {
            assert!(names.contains(owner.as_str()), "{owner}: not registered");
        }
        // Every upstream is registered, starts earlier, and lets this workload call at least
        // one of its methods.
        let graph = policy.call_graph();
        for (i, w) in WORKLOADS.iter().enumerate() {
            for up in w.upstreams {
                let at = WORKLOADS.iter().position(|u| u.name == *up);
                assert!(
                    at.is_some_and(|at| at < i),
                    "{}: {up} is not started before it",
                    w.name
                );
                assert!(
                    graph
                        .get(w.name)
                        .is_some_and(|callees| callees.contains(*up)),
                    "{} calls {up}, but no method of {up} admits it",
                    w.name
                );
            }
            assert_eq!(w.start.is_some(), w.optional, "{}", w.name);
        }
        assert_eq!(
            WORKLOADS
                .iter()
                .filter(|w| w.public)
                .map(|w| w.name)
                .collect::<Vec<_>>(),
            ["gateway"]
        );
    }
}
