//! Scenario B's baseline: the same public answers without the microservice split.
//!
//! One process opens the users, posts and comments databases with the services' own
//! libraries and answers `FeedService.GetPostThread` and `PostService.CreatePost` by calling
//! their handlers directly: no internal hops, no mTLS between parts, no second token check.
//! It serves one public TLS port (the gateway's certificate and public server) and
//! checks a bearer token once per call as the mesh's services do: with the users' Ed25519
//! keys behind the same bounded cache of verified tokens (`tessera_mesh::auth::TokenKeys`),
//! so a token's signature is checked once per process in both. GetPostThread is put
//! together as the gateway's `Feed` does it (GetPost and ListComments at once, then the
//! authors in batches), so both give the same bytes for the same data; scenario B checks that.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, try_join_all};
use tessera::{
    comments::v1::{ListCommentsRequest, comment_service_server::CommentService},
    gateway::v1::{
        GetPostThreadRequest, GetPostThreadResponse, ThreadComment,
        feed_service_server::{FeedService, FeedServiceServer},
    },
    posts::v1::{
        GetPostRequest,
        post_service_server::{PostService, PostServiceServer},
    },
    users::v1::{BatchGetUsersRequest, User, user_service_server::UserService},
};
use tessera_comments::Comments;
use tessera_gateway::service::{DEFAULT_COMMENT_PAGE_SIZE, MAX_COMMENT_PAGE_SIZE, USER_BATCH};
use tessera_mesh::{
    auth::{EndUser, TokenKeys, maybe_end_user},
    errors::Violations,
    tls::{TlsFiles, TlsSource},
};
use tessera_posts::Posts;
use tessera_users::Users;
use tonic::{Request, Response, Status, body::Body, service::Routes};

use crate::BenchError;

/// The three services' handlers in one process.
#[derive(Clone)]
pub struct Monolith {
    users: Users,
    posts: Posts,
    comments: Comments,
}

fn setup(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

impl Monolith {
    /// Opens `users.db`, `posts.db` and `comments.db` in `dir` (a `tessera up` data dir, with
    /// its key-encryption key).
    pub async fn open(dir: &Path) -> Result<Self, BenchError> {
        let db = |service: &str| dir.join(format!("{service}.db")).display().to_string();
        let kek = tessera_users::Kek::load_or_create(&dir.join(tessera_users::keys::DATA_DIR_KEK))
            .map_err(|e| setup("key-encryption key")(e.to_string()))?;
        let users = Users::open(
            &db("users"),
            tessera_users::UsersConfig {
                key_encryption_key: Some(kek),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| setup("users.db")(e.to_string()))?;
        let posts = Posts::open(&db("posts"))
            .await
            .map_err(|e| setup("posts.db")(e.to_string()))?;
        // CreateComment is not served here; its post check would call posts in-process.
        let in_process =
            tessera_client::Channel::from_service(PostServiceServer::new(posts.clone()));
        let comments = Comments::open(
            &db("comments"),
            tessera::posts::v1::post_service_client::PostServiceClient::new(in_process),
        )
        .await
        .map_err(|e| setup("comments.db")(e.to_string()))?;
        Ok(Self {
            users,
            posts,
            comments,
        })
    }

    /// The public services: FeedService (GetPostThread) and PostService (CreatePost among
    /// others), behind the one token check.
    pub fn service(&self) -> Authenticated<Routes> {
        let routes = Routes::new(FeedServiceServer::new(self.clone()))
            .add_service(PostServiceServer::new(self.posts.clone()));
        Authenticated {
            inner: routes,
            keys: self.users.token_keys(),
        }
    }

    /// Serves [`Monolith::service`] on `listener` with the certificate in `tls_dir` until
    /// `stop` turns true.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls_dir: &Path,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), BenchError> {
        let tls = TlsSource::load(TlsFiles::in_dir(tls_dir))
            .map_err(|e| setup("monolith certificate")(e.to_string()))?;
        // The gateway's own public server: the same TLS, HTTP/2 settings and per-client
        // limits (connections per address, header, body and idle timeouts).
        tessera_mesh::edge::serve_public(
            listener,
            tls,
            self.service(),
            tessera_mesh::edge::PublicLimits::default(),
            stop,
            Duration::from_secs(1),
        )
        .await
        .map_err(|source| BenchError::Io {
            what: "serving the monolith".into(),
            source,
        })
    }

    /// Closes the databases.
    pub async fn close(&self) {
        self.comments.db().close().await;
        self.posts.db().close().await;
        self.users.db().close().await;
    }

    async fn thread(
        &self,
        reader: Option<EndUser>,
        post_id: String,
        page_size: i32,
    ) -> Result<GetPostThreadResponse, Status> {
        let (post, page) = tokio::try_join!(
            self.posts.get_post(Request::new(GetPostRequest {
                post_id: post_id.clone()
            })),
            self.comments
                .list_comments(Request::new(ListCommentsRequest {
                    post_id,
                    page_size,
                    page_token: String::new(),
                })),
        )?;
        let post = post
            .into_inner()
            .post
            .ok_or_else(|| Status::internal("GetPost returned no post"))?;
        let page = page.into_inner();
        let mut seen = HashSet::new();
        let ids: Vec<String> = std::iter::once(&post.author_id)
            .chain(page.comments.iter().map(|c| &c.author_id))
            .filter(|id| !id.is_empty() && seen.insert(id.as_str()))
            .cloned()
            .collect();
        // The users handler shows a reader their own email, as the mesh's users does.
        let batches = ids.chunks(USER_BATCH).map(|chunk| {
            let mut req = Request::new(BatchGetUsersRequest {
                user_ids: chunk.to_vec(),
            });
            if let Some(reader) = &reader {
                req.extensions_mut().insert(reader.clone());
            }
            self.users.batch_get_users(req)
        });
        let users: HashMap<String, User> = try_join_all(batches)
            .await?
            .into_iter()
            .flat_map(|r| r.into_inner().users)
            .map(|u| (u.user_id.clone(), u))
            .collect();
        let author = users.get(&post.author_id).cloned();
        let comments = page
            .comments
            .into_iter()
            .map(|comment| ThreadComment {
                author: users.get(&comment.author_id).cloned(),
                comment: Some(comment),
            })
            .collect();
        Ok(GetPostThreadResponse {
            post: Some(post),
            author,
            comments,
            next_comment_page_token: page.next_page_token,
        })
    }
}

#[tonic::async_trait]
impl FeedService for Monolith {
    async fn get_post_thread(
        &self,
        request: Request<GetPostThreadRequest>,
    ) -> Result<Response<GetPostThreadResponse>, Status> {
        let reader = maybe_end_user(&request).cloned();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.check(
            req.post_id.trim().is_empty(),
            "post_id",
            "must not be empty",
        );
        v.check(
            req.comment_page_size < 0,
            "comment_page_size",
            "must not be negative",
        );
        v.into_result()?;
        let page_size = match req.comment_page_size {
            0 => DEFAULT_COMMENT_PAGE_SIZE,
            n => n.min(MAX_COMMENT_PAGE_SIZE),
        };
        Ok(Response::new(
            self.thread(reader, req.post_id, page_size).await?,
        ))
    }
}

/// Verifies the bearer token of a call that carries one and hands the handlers the
/// [`EndUser`]; a bad token is UNAUTHENTICATED before any handler runs. Handlers that need a
/// user (CreatePost) refuse calls without one themselves.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    keys: TokenKeys,
}

impl<S> tower::Service<http::Request<Body>> for Authenticated<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let token = req.headers().get(http::header::AUTHORIZATION).map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        });
        let keys = self.keys.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if let Some(token) = token {
                match keys.verify(&token).await {
                    Ok(claims) => {
                        let user = EndUser {
                            claims,
                            token: Arc::from(token),
                        };
                        req.extensions_mut().insert(user);
                    }
                    Err(e) => {
                        let status = Status::unauthenticated(format!("invalid access token: {e}"));
                        return Ok(status.into_http());
                    }
                }
            }
            inner.call(req).await
        })
    }
}

/// `tessera-bench monolith --data-dir DIR --tls-dir CERT`: serves DIR's databases on a
/// loopback port with CERT's certificate, prints `listening ADDR`, and stops when stdin
/// closes.
pub async fn run(dir: &Path, tls_dir: &Path) -> Result<(), BenchError> {
    crate::server::no_tracing();
    let monolith = Monolith::open(dir).await?;
    let listener = tessera_mesh::server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|source| BenchError::Io {
            what: "binding the monolith's port".into(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| BenchError::Io {
        what: "the monolith's address".into(),
        source,
    })?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let served = monolith.serve(listener, tls_dir, stop);
    crate::server::announce(addr);
    let stopper = async {
        crate::server::stdin_closed().await;
        let _ = stop_tx.send(true);
    };
    let (result, ()) = tokio::join!(served, stopper);
    monolith.close().await;
    result
}
