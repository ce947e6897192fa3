//! Turning [`Settings`] into a running service: its TLS material, database, downstream
//! clients, token keys, event consumers and the workload server around its handlers. The
//! one place that knows how the services depend on each other.

use std::{collections::HashMap, sync::Arc};

use crate::workloads::{StartContext, StartFuture, Started, declared_only};
use anyhow::Context;
use tessera::{
    comments::v1::comment_service_server::CommentServiceServer,
    gateway::v1::feed_service_server::FeedServiceServer,
    notifications::v1::notification_service_server::NotificationServiceServer,
    posts::v1::post_service_server::PostServiceServer,
    users::v1::{GetJwksRequest, user_service_server::UserServiceServer},
};
use tessera_client::{Channel, ClientBuilder, Clients};
use tessera_mesh::{
    auth::TokenKeys,
    config::Settings,
    server::{Listeners, Workload, bind},
    shutdown::Shutdown,
    tls::{ClientTls, TlsFiles, TlsSource},
    token::Verifier,
};
use tokio::task::JoinHandle;
use tonic::service::Routes;

/// The upstreams each service calls, so `serve` can refuse to start without their targets.
pub fn required_targets(service: &str) -> impl Iterator<Item = &'static str> {
    crate::workloads::upstreams(service)
}

/// `tessera serve <service>`: telemetry, bind, start, wait for SIGTERM/SIGINT, drain.
pub async fn serve_one(mut settings: Settings) -> anyhow::Result<()> {
    let telemetry = tessera_mesh::telemetry::init(
        &settings.service,
        &settings.log_filter,
        settings.log_format,
        settings.otlp_endpoint.as_deref(),
    )?;
    settings.server.tracer = telemetry.tracer();
    let listeners = Listeners {
        grpc: bind(settings.grpc_addr).await?,
        admin: bind(settings.admin_addr).await?,
        public: if crate::workloads::find(&settings.service).is_some_and(|w| w.public) {
            Some(bind(settings.public_addr).await?)
        } else {
            None
        },
    };
    let (trigger, shutdown) = Shutdown::new();
    let running = start(settings, listeners, shutdown).await?;
    tessera_mesh::shutdown::signal().await;
    trigger.trigger();
    running.await.context("the service task failed")?
}

/// The database of a service: `DATABASE_URL` when set, else `<data_dir>/<service>.db`.
fn database(settings: &Settings) -> anyhow::Result<String> {
    if let Some(url) = &settings.database_url {
        return Ok(url.clone());
    }
    tessera_mesh::private::secure_dir(&settings.data_dir).with_context(|| {
        format!(
            "TESSERA_DATA_DIR: cannot create {}",
            settings.data_dir.display()
        )
    })?;
    Ok(settings
        .data_dir
        .join(format!("{}.db", settings.service))
        .display()
        .to_string())
}

/// Token keys fetched from UserService.GetJwks (and again when a token names a new key).
fn fetched_keys(clients: &Clients) -> TokenKeys {
    let clients = clients.clone();
    TokenKeys::fetched(move || {
        let mut users = clients.users();
        async move {
            let jwks = users.get_jwks(GetJwksRequest {}).await?.into_inner();
            let mut verifier = Verifier::new();
            for key in jwks.keys {
                verifier.add_jwk(&key.kid, &key.x)?;
            }
            Ok(verifier)
        }
    })
}

/// Starts `settings.service` on `listeners`; the task ends after `shutdown` fires and the
/// service has drained.
pub async fn start(
    settings: Settings,
    listeners: Listeners,
    shutdown: Shutdown,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let tls = TlsSource::watch(
        TlsFiles::in_dir(&settings.tls_dir),
        settings.tls_reload_interval,
    )
    .with_context(|| format!("TESSERA_TLS_DIR {}", settings.tls_dir.display()))?;
    let expected = tessera_mesh::identity::SpiffeId::new(
        &settings.trust_domain,
        &settings.namespace,
        &settings.service,
    )?;
    if tls.identity() != expected {
        anyhow::bail!(
            "TESSERA_TLS_DIR: the certificate is for {}, but this is {expected}",
            tls.identity()
        );
    }
    // The gateway's public port: its own certificate when given, re-read like the mesh one.
    let tls = match &settings.public_tls_dir {
        Some(dir) => tls.with_public(
            tessera_mesh::public_tls::PublicTls::watch(
                tessera_mesh::public_tls::PublicTlsFiles::in_dir(dir),
                settings.tls_reload_interval,
            )
            .with_context(|| format!("TESSERA_PUBLIC_TLS_DIR {}", dir.display()))?,
        ),
        None => tls,
    };
    // One balanced channel per upstream, shared by the typed clients and the gateway proxy,
    // each pinned to its upstream's SPIFFE id (this workload's trust domain and namespace).
    let builder = ClientBuilder::mtls(ClientTls::from(tls.clone()));
    let mut channels: HashMap<&str, Channel> = HashMap::new();
    for upstream in crate::workloads::upstreams(&settings.service) {
        if let Some(target) = settings.target(upstream) {
            let channel = builder
                .channel_to(upstream, target)
                .with_context(|| format!("TESSERA_{}_TARGET", upstream.to_ascii_uppercase()))?;
            channels.insert(upstream, channel);
        }
    }
    // Every client gets only the methods the registry declares for this workload.
    let service = settings.service.as_str();
    let declared = |upstream: &str| {
        channels
            .get(upstream)
            .map(|channel| declared_only(service, upstream, channel.clone()))
    };
    let clients = Clients::from_channels(
        declared("users"),
        declared("posts"),
        declared("comments"),
        declared("notifications"),
    );
    let policy = Arc::new(crate::workloads::policy()?);
    let max = settings.server.max_message_size;
    let stop = shutdown.receiver();

    // What it serves and how it starts come from the registry.
    let spec = crate::workloads::find(service)
        .ok_or_else(|| anyhow::anyhow!("unknown service {service:?}"))?;
    let ctx = StartContext {
        database: if spec.database {
            database(&settings)?
        } else {
            String::new()
        },
        clients: clients.clone(),
        channels: channels
            .iter()
            .map(|(name, channel)| ((*name).to_owned(), channel.clone()))
            .collect(),
        builder: builder.clone(),
        settings: settings.clone(),
        max_message_size: max,
        stop: stop.clone(),
    };
    let started = (spec.start)(ctx).await?;
    let keys = started.keys.unwrap_or_else(|| fetched_keys(&clients));
    let (routes, public) = (started.routes, started.public);

    let upstreams: Vec<Channel> = channels.values().cloned().collect();
    let workload = Workload::new(
        &settings.service,
        tls,
        policy,
        Some(keys.clone()),
        settings.server.clone(),
    )
    .ready_when(crate::readiness::gate(keys, upstreams));
    let workload = match started.public_edge {
        Some(edge) => workload.with_public_edge(edge),
        None => workload,
    };
    Ok(tokio::spawn(async move {
        workload
            .run(routes, &[spec.served], listeners, public, shutdown)
            .await
            .map_err(anyhow::Error::from)
    }))
}

/// users: accounts, sessions and the token signing keys it rotates.
pub(crate) fn start_users(ctx: StartContext) -> StartFuture {
    Box::pin(async move {
        let settings = &ctx.settings;
        let config = tessera_users::UsersConfig {
            bootstrap_admin: settings.bootstrap_admin.clone(),
            hash_concurrency: settings.service_limits.password_hash_concurrency,
            hash_queue: settings.service_limits.password_hash_queue,
            login_failures_per_minute: settings.service_limits.login_failures_per_minute,
            token_ttl: settings.tokens.access_token_ttl,
            refresh_token_ttl: settings.tokens.refresh_token_ttl,
            key_rotation: settings.tokens.signing_key_rotation,
            key_encryption_key: Some(crate::keys::key_encryption_key(settings)?),
            ..Default::default()
        };
        let users = tessera_users::Users::open(&ctx.database, config).await?;
        tokio::spawn(users.clone().maintain_keys(ctx.stop.clone()));
        // It signs the tokens, so it verifies them with its own keys.
        let keys = users.token_keys();
        let server = UserServiceServer::new(users).max_decoding_message_size(ctx.max_message_size);
        Ok(Started {
            keys: Some(keys),
            ..Started::from(Routes::new(server))
        })
    })
}

/// posts, following users' events (a deleted author's posts go).
pub(crate) fn start_posts(ctx: StartContext) -> StartFuture {
    Box::pin(async move {
        let posts = tessera_posts::Posts::open(&ctx.database)
            .await?
            .with_users(ctx.clients.users());
        tokio::spawn(tessera_posts::follow_user_events(
            posts.clone(),
            ctx.clients.channel("users"),
            ctx.stop.clone(),
        ));
        let server = PostServiceServer::new(posts).max_decoding_message_size(ctx.max_message_size);
        Ok(Routes::new(server).into())
    })
}

/// comments, following posts' and users' events.
pub(crate) fn start_comments(ctx: StartContext) -> StartFuture {
    Box::pin(async move {
        let comments = tessera_comments::Comments::open(&ctx.database, ctx.clients.posts())
            .await?
            .with_users(ctx.clients.users());
        tokio::spawn(tessera_comments::follow_post_events(
            comments.clone(),
            ctx.clients.channel("posts"),
            ctx.stop.clone(),
        ));
        tokio::spawn(tessera_comments::follow_user_events(
            comments.clone(),
            ctx.clients.channel("users"),
            ctx.stop.clone(),
        ));
        let server =
            CommentServiceServer::new(comments).max_decoding_message_size(ctx.max_message_size);
        Ok(Routes::new(server).into())
    })
}

/// notifications, following comments' and users' events, with its subscription limits.
pub(crate) fn start_notifications(ctx: StartContext) -> StartFuture {
    Box::pin(async move {
        let limits = &ctx.settings.service_limits;
        let limits = tessera_notifications::SubscriptionLimits {
            per_user: limits.subscriptions_per_user,
            per_replica: limits.subscriptions_per_replica,
            max_lifetime: limits.subscription_max_lifetime,
        };
        let notifications =
            tessera_notifications::Notifications::open_with_limits(&ctx.database, limits).await?;
        tokio::spawn(tessera_notifications::follow_comment_events(
            notifications.clone(),
            ctx.clients.channel("comments"),
            ctx.stop.clone(),
        ));
        tokio::spawn(tessera_notifications::follow_user_events(
            notifications.clone(),
            ctx.clients.channel("users"),
            ctx.stop.clone(),
        ));
        let server = NotificationServiceServer::new(notifications)
            .max_decoding_message_size(ctx.max_message_size);
        Ok(Routes::new(server).into())
    })
}

/// gateway: FeedService on the internal port, and the public port that proxies the public
/// methods (with its cache of posts and profiles, rate limits, HTTP/JSON and gRPC-Web).
pub(crate) fn start_gateway(ctx: StartContext) -> StartFuture {
    Box::pin(async move {
        let (settings, clients, max) = (&ctx.settings, &ctx.clients, ctx.max_message_size);
        let keys = fetched_keys(clients);
        // Posts and profiles, kept fresh by following their owners' events.
        let cache = tessera_gateway::Cache::new(Default::default());
        tokio::spawn(tessera_gateway::cache::follow_post_events(
            cache.clone(),
            clients.posts(),
            ctx.stop.clone(),
        ));
        tokio::spawn(tessera_gateway::cache::follow_user_events(
            cache.clone(),
            clients.users(),
            ctx.stop.clone(),
        ));
        let feed = tessera_gateway::Feed::new(clients.posts(), clients.comments(), clients.users())
            .with_cache(cache.clone());
        let feed_server = FeedServiceServer::new(feed).max_decoding_message_size(max);
        let service = settings.service.as_str();
        let mut upstreams = tessera_gateway::Upstreams::new();
        for (upstream, unary) in &ctx.channels {
            // Streams get connections of their own, so open subscriptions cannot starve the
            // unary calls on the shared ones.
            let target = settings.target(upstream).unwrap_or_default();
            let streaming = ctx
                .builder
                .channel_to(upstream, target)
                .with_context(|| format!("TESSERA_{}_TARGET", upstream.to_ascii_uppercase()))?;
            upstreams.insert(
                upstream,
                declared_only(service, upstream, unary.clone()),
                declared_only(service, upstream, streaming),
            );
        }
        let sizes = tessera_gateway::SizeLimits {
            max_request: max,
            max_response: max,
            ..Default::default()
        };
        let limits = tessera_gateway::EdgeLimits {
            rates: tessera_gateway::RateLimits::from(settings.rate_limits),
            sizes,
        };
        let public =
            tessera_gateway::public_service_cached(&upstreams, keys.clone(), limits, &cache)?;
        // The public port also answers HTTP/JSON, gRPC-Web, /openapi.json and `/`.
        let edge = tessera_gateway::http_json::public_edge(
            &settings.cors_origins,
            max,
            settings.server.public.body_timeout,
        )?;
        Ok(Started {
            routes: Routes::new(feed_server),
            keys: Some(keys),
            public: Some(public),
            public_edge: Some(edge),
        })
    })
}
