//! The one list of workloads the binary knows: what each serves, exactly which methods it
//! calls on each upstream, whether it keeps a database or has a public port, and how to
//! start it. `serve` (required targets, upstream channels
//! that refuse undeclared methods), `up` (ports, certificates, databases, the table), `certs`
//! and the policy checks read it; adding a service is one entry here, naming the descriptor
//! set its contract is compiled into (where its access rules and reflection come from), and
//! the dependency on its crate.

use std::{future::Future, pin::Pin, sync::OnceLock};

use tessera::{
    comments::v1::{comment_service_methods as comments, comment_service_server},
    gateway::v1::feed_service_server,
    notifications::v1::{
        notification_service_methods as notifications, notification_service_server,
    },
    posts::v1::{post_service_methods as posts, post_service_server},
    users::v1::{user_service_methods as users, user_service_server},
};
use tessera_client::{Channel, ClientBuilder, Clients};
use tessera_example_digest::v1::digest_service_server;
use tessera_mesh::{
    auth::TokenKeys,
    config::Settings,
    contracts::Contracts,
    policy::Policy,
    server::{GrpcService, PublicEdge},
};
use tokio::sync::watch;
use tonic::{Status, body::Body, service::Routes};
use tower::BoxError;

/// What a workload gets to start with.
pub struct StartContext {
    /// Its database: a SQLite path or a `postgres://` URL (empty unless `database: true`).
    pub database: String,
    /// Typed clients of its upstreams, each refusing the methods it did not declare (those
    /// without a target fail with FAILED_PRECONDITION).
    pub clients: Clients,
    /// The balanced mTLS channel to each upstream with a target, not yet limited to the
    /// declared methods (the gateway's proxy wraps them itself).
    pub channels: std::collections::BTreeMap<String, Channel>,
    /// What made those channels, for more of them (the gateway's streaming connections).
    pub builder: ClientBuilder,
    /// All of its settings.
    pub settings: Settings,
    /// The largest message its server decodes.
    pub max_message_size: usize,
    /// Turns `true` when the workload shuts down; background loops end on it.
    pub stop: watch::Receiver<bool>,
}

/// A started workload: what the mesh server serves for it.
pub struct Started {
    /// Its gRPC service(s); the server wraps them (identity, rules, limits).
    pub routes: Routes,
    /// The keys that verify end-user tokens; `None`: fetched from UserService.GetJwks.
    pub keys: Option<TokenKeys>,
    /// The public port's service, for the workload with `public: true`.
    pub public: Option<GrpcService>,
    /// What answers in front of the public port's gRPC (HTTP/JSON and the like).
    pub public_edge: Option<PublicEdge>,
}

impl From<Routes> for Started {
    /// An internal-only workload that verifies tokens with the fetched keys.
    fn from(routes: Routes) -> Self {
        Self {
            routes,
            keys: None,
            public: None,
            public_edge: None,
        }
    }
}

/// A started workload, or why it could not start.
pub type StartFuture = Pin<Box<dyn Future<Output = anyhow::Result<Started>> + Send>>;

/// How a workload is started: its handlers, background loops and routes.
pub type StartFn = fn(StartContext) -> StartFuture;

/// One workload of the mesh.
#[derive(Clone, Copy)]
pub struct WorkloadSpec {
    /// The workload name: the SPIFFE id's service account and the contract's package
    /// (`tessera.<name>.v1`).
    pub name: &'static str,
    /// The gRPC service it serves, from the generated code's `NamedService::NAME`.
    pub served: &'static str,
    /// The workloads it calls and the methods it calls on each: `serve` refuses to start
    /// without their `TESSERA_<NAME>_TARGET`, and its clients refuse any other method. The
    /// contracts must admit it to exactly these (`tessera-cli`'s tests check).
    pub upstreams: &'static [Upstream],
    /// It keeps a database (`up` gives it one; on PostgreSQL its own).
    pub database: bool,
    /// The cursors of its event consumers in that database (`tessera cursor`).
    pub cursors: &'static [&'static str],
    /// It has the public port (the gateway).
    pub public: bool,
    /// `tessera up` runs it only when asked (`--with NAME`); `certs` always issues its
    /// certificate.
    pub optional: bool,
    /// How to start it (the five's are in `crate::wiring`).
    pub start: StartFn,
    /// The encoded descriptor set its contract is in: `tessera::FILE_DESCRIPTOR_SET` for a
    /// contract under `proto/`, or the `FILE_DESCRIPTOR_SET` of a service that compiles its
    /// own (its access rules and reflection come from there).
    pub contract: &'static [u8],
}

/// One upstream of a workload and the methods the workload calls on it.
#[derive(Clone, Copy, Debug)]
pub struct Upstream {
    /// The upstream workload.
    pub name: &'static str,
    /// Full gRPC paths, from the generated `<service>_methods` constants.
    pub calls: &'static [&'static str],
}

/// Every workload but users verifies end-user tokens with the keys from `GetJwks`
/// (`wiring::fetched_keys`).
const TOKEN_KEYS: &str = users::GET_JWKS;

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
        start: crate::wiring::start_users,
        contract: tessera::FILE_DESCRIPTOR_SET,
    },
    WorkloadSpec {
        name: "posts",
        served: <post_service_server::PostServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &[Upstream {
            name: "users",
            // The user-deletion events; the current role of a would-be moderator.
            calls: &[users::WATCH_EVENTS, users::GET_USER, TOKEN_KEYS],
        }],
        database: true,
        cursors: &[tessera_posts::USER_EVENTS_CURSOR],
        public: false,
        optional: false,
        start: crate::wiring::start_posts,
        contract: tessera::FILE_DESCRIPTOR_SET,
    },
    WorkloadSpec {
        name: "comments",
        served:
            <comment_service_server::CommentServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &[
            Upstream {
                name: "posts",
                // The post a new comment is on; the post-deletion events.
                calls: &[posts::GET_POST, posts::WATCH_EVENTS],
            },
            Upstream {
                name: "users",
                calls: &[users::WATCH_EVENTS, users::GET_USER, TOKEN_KEYS],
            },
        ],
        database: true,
        cursors: &[
            tessera_comments::POST_EVENTS_CURSOR,
            tessera_comments::USER_EVENTS_CURSOR,
        ],
        public: false,
        optional: false,
        start: crate::wiring::start_comments,
        contract: tessera::FILE_DESCRIPTOR_SET,
    },
    WorkloadSpec {
        name: "notifications",
        served: <notification_service_server::NotificationServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &[
            Upstream {
                name: "comments",
                calls: &[comments::WATCH_EVENTS],
            },
            Upstream {
                name: "users",
                calls: &[users::WATCH_EVENTS, TOKEN_KEYS],
            },
        ],
        database: true,
        cursors: &[
            tessera_notifications::COMMENT_EVENTS_CURSOR,
            tessera_notifications::USER_EVENTS_CURSOR,
        ],
        public: false,
        optional: false,
        start: crate::wiring::start_notifications,
        contract: tessera::FILE_DESCRIPTOR_SET,
    },
    WorkloadSpec {
        name: "gateway",
        served: <feed_service_server::FeedServiceServer<()> as tonic::server::NamedService>::NAME,
        // The public port proxies every public method of the four, and FeedService composes
        // GetPost, ListComments and BatchGetUsers; all of those are among them. Its cache of
        // posts and profiles follows users' and posts' WatchEvents.
        upstreams: &[
            Upstream {
                name: "users",
                calls: &[
                    users::CREATE_USER,
                    users::LOGIN,
                    users::REFRESH_TOKEN,
                    users::LOGOUT,
                    users::GET_USER,
                    users::BATCH_GET_USERS,
                    TOKEN_KEYS,
                    users::SET_USER_ROLE,
                    users::DELETE_USER,
                    users::WATCH_EVENTS,
                ],
            },
            Upstream {
                name: "posts",
                calls: &[
                    posts::CREATE_POST,
                    posts::GET_POST,
                    posts::LIST_POSTS,
                    posts::UPDATE_POST,
                    posts::DELETE_POST,
                    posts::WATCH_EVENTS,
                ],
            },
            Upstream {
                name: "comments",
                calls: &[
                    comments::CREATE_COMMENT,
                    comments::LIST_COMMENTS,
                    comments::DELETE_COMMENT,
                ],
            },
            Upstream {
                name: "notifications",
                calls: &[
                    notifications::LIST_NOTIFICATIONS,
                    notifications::MARK_NOTIFICATIONS_READ,
                    notifications::SUBSCRIBE_NOTIFICATIONS,
                ],
            },
        ],
        database: false,
        cursors: &[],
        public: true,
        optional: false,
        start: crate::wiring::start_gateway,
        contract: tessera::FILE_DESCRIPTOR_SET,
    },
    // Another team's service (examples/digest): this entry is all the binary needs.
    WorkloadSpec {
        name: "digest",
        served:
            <digest_service_server::DigestServiceServer<()> as tonic::server::NamedService>::NAME,
        upstreams: &[
            Upstream {
                name: "posts",
                calls: &[posts::GET_POST, posts::WATCH_EVENTS],
            },
            Upstream {
                name: "notifications",
                calls: &[notifications::LIST_NOTIFICATIONS],
            },
            Upstream {
                name: "users",
                calls: &[TOKEN_KEYS],
            },
        ],
        database: true,
        cursors: &[tessera_example_digest::POST_EVENTS_CURSOR],
        public: false,
        optional: true,
        start: start_digest,
        contract: tessera_example_digest::FILE_DESCRIPTOR_SET,
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
        )
        .into())
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
pub fn upstreams(service: &str) -> impl Iterator<Item = &'static str> {
    find(service)
        .map(|w| w.upstreams)
        .unwrap_or_default()
        .iter()
        .map(|u| u.name)
}

/// `channel` to `upstream`, limited to the methods `caller` declared for it: any other call
/// fails with FAILED_PRECONDITION before it leaves the process, so a call missing from the
/// registry (and so from the contracts) fails every test that makes it, not in production
/// with PERMISSION_DENIED.
pub fn declared_only(caller: &str, upstream: &str, channel: Channel) -> Channel {
    let calls = find(caller)
        .and_then(|w| w.upstreams.iter().find(|u| u.name == upstream))
        .map(|u| u.calls)
        .unwrap_or_default();
    Channel::from_service(Declared {
        caller: caller.into(),
        calls,
        inner: channel,
    })
}

/// The service behind [`declared_only`].
#[derive(Clone)]
struct Declared {
    caller: std::sync::Arc<str>,
    calls: &'static [&'static str],
    inner: Channel,
}

impl tower::Service<http::Request<Body>> for Declared {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = <Channel as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if self.calls.contains(&path) {
            return self.inner.call(request);
        }
        let status = Status::failed_precondition(format!(
            "{} does not declare {path} among its calls (crates/cli/src/workloads.rs)",
            self.caller
        ));
        Box::pin(std::future::ready(Err(Box::new(status) as BoxError)))
    }
}

/// Every registered workload's contract as one: Tessera's own plus those compiled in the
/// services' own crates. Decoded once per process.
pub fn contracts() -> anyhow::Result<&'static Contracts> {
    static CONTRACTS: OnceLock<Result<Contracts, String>> = OnceLock::new();
    CONTRACTS
        .get_or_init(|| {
            let sets: Vec<&[u8]> = WORKLOADS.iter().map(|w| w.contract).collect();
            Contracts::from_descriptor_sets(&sets).map_err(|err| err.to_string())
        })
        .as_ref()
        .map_err(|err| anyhow::anyhow!("a compiled-in contract does not decode: {err}"))
}

/// The access rules of every registered workload's contract ([`contracts`]): what `serve`
/// enforces and `tessera policy` prints.
pub fn policy() -> anyhow::Result<Policy> {
    Ok(Policy::from_contracts(contracts()?))
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

    #[test]
    fn every_workload_serves_its_own_contract_and_calls_only_what_it_may() {
        let policy = policy().unwrap_or_else(|err| panic!("{err}"));
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
        // Every upstream is registered, starts earlier, and is named after the package of
        // every method declared on it.
        for (i, w) in WORKLOADS.iter().enumerate() {
            for up in w.upstreams {
                let at = WORKLOADS.iter().position(|u| u.name == up.name);
                assert!(
                    at.is_some_and(|at| at < i),
                    "{}: {} is not started before it",
                    w.name,
                    up.name
                );
                assert!(
                    !up.calls.is_empty(),
                    "{}: calls nothing on {}",
                    w.name,
                    up.name
                );
                for call in up.calls {
                    assert_eq!(
                        policy.rule(call).map(|m| m.owner.as_str()),
                        Some(up.name),
                        "{}: {call} is not a method of {}",
                        w.name,
                        up.name
                    );
                }
            }
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

    #[test]
    fn k8s_network_policies_match_every_workloads_contract() {
        let generated =
            tessera_mesh::netpol::network_policies(&policy().unwrap_or_else(|err| panic!("{err}")));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../k8s/base/networkpolicies-generated.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{err}"));
        assert!(
            committed == generated,
            "k8s/base/networkpolicies-generated.yaml drifted from the contracts; regenerate it with \
             `cargo run -p tessera-cli -- policy --netpol > k8s/base/networkpolicies-generated.yaml`"
        );
        // A workload whose contract is compiled in its own crate is in it too.
        assert!(generated.contains("name: allow-to-digest\n"), "{generated}");
    }

    /// caller → the methods it calls, from the registry.
    fn declared() -> BTreeSet<(String, String)> {
        WORKLOADS
            .iter()
            .flat_map(|w| w.upstreams.iter().map(move |u| (w.name, u)))
            .flat_map(|(caller, u)| {
                u.calls
                    .iter()
                    .map(move |c| (caller.to_owned(), (*c).to_owned()))
            })
            .collect()
    }

    #[test]
    fn the_contracts_admit_each_workload_to_exactly_the_methods_it_declares() {
        // A workload's own methods are open to it without a rule, so only calls across
        // workloads count.
        let granted: BTreeSet<(String, String)> = policy()
            .unwrap_or_else(|err| panic!("{err}"))
            .methods()
            .flat_map(|m| {
                m.callers
                    .iter()
                    .filter(|caller| **caller != m.owner)
                    .map(|caller| (caller.clone(), m.path.clone()))
            })
            .collect();
        let declared = declared();
        let excess: Vec<_> = granted.difference(&declared).collect();
        let missing: Vec<_> = declared.difference(&granted).collect();
        assert!(
            excess.is_empty(),
            "the contracts admit callers to methods they never call (narrow the rule's \
             `callers` or declare the call): {excess:?}"
        );
        assert!(
            missing.is_empty(),
            "workloads declare calls their upstream's contract refuses (add the caller to \
             the rule): {missing:?}"
        );
    }

    #[test]
    fn the_gateway_declares_every_public_method_it_proxies() {
        // The public port forwards each public method of its upstreams; a public method
        // it did not declare would be refused on every request.
        let gateway = find("gateway").unwrap_or_else(|| panic!("no gateway"));
        let upstreams: Vec<&str> = gateway.upstreams.iter().map(|u| u.name).collect();
        let public: BTreeSet<String> = policy()
            .unwrap_or_else(|err| panic!("{err}"))
            .methods()
            .filter(|m| m.public && upstreams.contains(&m.owner.as_str()))
            .map(|m| m.path.clone())
            .collect();
        let declared: BTreeSet<String> = declared()
            .into_iter()
            .filter(|(caller, _)| caller == "gateway")
            .map(|(_, path)| path)
            .collect();
        let proxied: BTreeSet<String> = declared.intersection(&public).cloned().collect();
        assert_eq!(proxied, public);
        // Beyond the proxied methods it calls only what its cache follows.
        let own: BTreeSet<&str> = declared.difference(&public).map(String::as_str).collect();
        assert_eq!(
            own,
            BTreeSet::from([posts::WATCH_EVENTS, users::WATCH_EVENTS])
        );
    }

    #[tokio::test]
    async fn a_channel_refuses_a_method_its_workload_did_not_declare() {
        use tessera::notifications::v1::notification_service_client::NotificationServiceClient;
        use tessera::posts::v1::post_service_client::PostServiceClient;
        use tessera::users::v1::user_service_client::UserServiceClient;
        use tessera::{
            notifications::v1::ListNotificationsRequest, posts::v1::GetPostRequest,
            users::v1::BatchGetUsersRequest,
        };

        // Behind the filter, a channel that answers every call UNAVAILABLE: a declared call
        // gets through to it, an undeclared one never does.
        let nowhere = |name| {
            declared_only(
                "notifications",
                name,
                Channel::from_service(tower::service_fn(|_: http::Request<Body>| async {
                    Err::<http::Response<Body>, BoxError>(Box::new(Status::unavailable("down")))
                })),
            )
        };
        let mut users = UserServiceClient::new(nowhere("users"));
        let refused = users
            .batch_get_users(BatchGetUsersRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("BatchGetUsers"), "{refused:?}");
        let jwks = users
            .get_jwks(tessera::users::v1::GetJwksRequest {})
            .await
            .unwrap_err();
        assert_eq!(jwks.code(), tonic::Code::Unavailable, "{jwks:?}");
        // No declared upstream at all: every method is refused.
        let refused = PostServiceClient::new(nowhere("posts"))
            .get_post(GetPostRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        let refused = NotificationServiceClient::new(nowhere("notifications"))
            .list_notifications(ListNotificationsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    }
}
