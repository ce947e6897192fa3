//! `tessera.gateway.v1.FeedService`: views composed from the internal services.
//!
//! GetPostThread makes three downstream calls whatever the size of the page (more only when
//! the authors exceed one BatchGetUsers batch, at most two batches for the largest page):
//! GetPost and ListComments run concurrently, as both need only the post id, then one
//! BatchGetUsers fetches the post's author and every comment author together. A NOT_FOUND
//! from GetPost is the answer for a missing post.
//!
//! With a [`Cache`], the post and the profiles it holds are not fetched: a thread on a post
//! read before costs one call (ListComments). Profiles carrying more than their public view
//! for this reader (their own, or any for an ADMIN) are always fetched.

use std::collections::{HashMap, HashSet};

use futures::future::try_join_all;
use tessera::{
    comments::v1::{ListCommentsRequest, comment_service_client::CommentServiceClient},
    gateway::v1::{
        GetPostThreadRequest, GetPostThreadResponse, ThreadComment,
        feed_service_server::FeedService,
    },
    posts::v1::{GetPostRequest, Post, post_service_client::PostServiceClient},
    users::v1::{BatchGetUsersRequest, User, user_service_client::UserServiceClient},
};
use tessera_client::Channel;
use tessera_mesh::{auth::maybe_end_user, context, errors::Violations};
use tonic::{Request, Response, Status};

use crate::{
    Error,
    cache::{Cache, Lookup},
};

/// Comments per thread page when the request does not say.
pub const DEFAULT_COMMENT_PAGE_SIZE: i32 = 20;
/// The largest comment page; larger requests are capped to it.
pub const MAX_COMMENT_PAGE_SIZE: i32 = 100;
/// The most ids the gateway sends in one BatchGetUsers call.
pub const USER_BATCH: usize = 100;

/// The FeedService handler, over typed clients of the services it composes.
#[derive(Clone)]
pub struct Feed {
    posts: PostServiceClient<Channel>,
    comments: CommentServiceClient<Channel>,
    users: UserServiceClient<Channel>,
    cache: Option<Cache>,
}

/// What the reader may see of a profile beyond its public view, which decides whether a
/// cached copy (the public view) is the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reader {
    /// Anonymous: the public view of everyone.
    Anyone,
    /// Their own email.
    Owner(String),
    /// An ADMIN (every email), or a token whose claims are not at hand.
    Privileged,
}

impl Reader {
    fn sees_public_view_of(&self, user_id: &str) -> bool {
        match self {
            Reader::Anyone => true,
            Reader::Owner(me) => me != user_id,
            Reader::Privileged => false,
        }
    }
}

impl Feed {
    /// Composes over these clients, fetching every post and profile (no cache).
    pub fn new(
        posts: PostServiceClient<Channel>,
        comments: CommentServiceClient<Channel>,
        users: UserServiceClient<Channel>,
    ) -> Self {
        Self {
            posts,
            comments,
            users,
            cache: None,
        }
    }

    /// Serves posts and public profiles from `cache` (kept fresh by its followers, see
    /// [`crate::cache`]).
    pub fn with_cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    async fn thread(
        &self,
        post_id: String,
        page_size: i32,
        reader: &Reader,
    ) -> Result<GetPostThreadResponse, Error> {
        let mut comments = self.comments.clone();
        let page = async {
            let request = ListCommentsRequest {
                post_id: post_id.clone(),
                page_size,
                page_token: String::new(),
            };
            Ok::<_, Error>(comments.list_comments(request).await?.into_inner())
        };
        let (post, page) = tokio::try_join!(self.post(&post_id), page)?;

        // The post's author first, then each comment author once, in order of appearance.
        let mut seen = HashSet::new();
        let ids: Vec<String> = std::iter::once(&post.author_id)
            .chain(page.comments.iter().map(|c| &c.author_id))
            .filter(|id| !id.is_empty() && seen.insert(id.as_str()))
            .cloned()
            .collect();
        let users = self.authors(ids, reader).await?;

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

    /// The post, from the cache or from PostService.
    async fn post(&self, post_id: &str) -> Result<Post, Error> {
        let lease = match self.cache.as_ref().map(|c| c.post(post_id)) {
            Some(Lookup::Hit(post)) => return Ok(post),
            Some(Lookup::Miss(lease)) => lease,
            None => None,
        };
        let request = GetPostRequest {
            post_id: post_id.to_owned(),
        };
        let post = self
            .posts
            .clone()
            .get_post(request)
            .await?
            .into_inner()
            .post
            .ok_or_else(|| Error::Internal("GetPost returned no post".into()))?;
        if let Some(lease) = lease {
            lease.fill(post.clone());
        }
        Ok(post)
    }

    /// The users among `ids` that exist, as `reader` may see them: public views from the
    /// cache where it has them, the rest fetched (and their public views kept).
    async fn authors(
        &self,
        ids: Vec<String>,
        reader: &Reader,
    ) -> Result<HashMap<String, User>, Status> {
        let mut found = HashMap::new();
        let mut leases = Vec::new();
        let mut missing = Vec::new();
        for id in ids {
            let cached = match &self.cache {
                Some(cache) if reader.sees_public_view_of(&id) => cache.user(&id),
                _ => Lookup::Miss(None),
            };
            match cached {
                Lookup::Hit(user) => {
                    found.insert(id, user);
                }
                Lookup::Miss(lease) => {
                    leases.extend(lease);
                    missing.push(id);
                }
            }
        }
        let fetched = self.batch_get_users(missing).await?;
        for lease in leases {
            // A user that does not exist leaves its lease unfilled, which frees it.
            if let Some(user) = fetched.get(lease.key()) {
                lease.fill(User {
                    // Already empty for this reader; kept out of the cache whatever happens.
                    email: String::new(),
                    ..user.clone()
                });
            }
        }
        found.extend(fetched);
        Ok(found)
    }

    /// The users among `ids` that exist (deleted ones are simply absent), in as few calls as
    /// the batch size allows, run concurrently.
    async fn batch_get_users(&self, ids: Vec<String>) -> Result<HashMap<String, User>, Status> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let calls = ids.chunks(USER_BATCH).map(|chunk| {
            let mut users = self.users.clone();
            let request = BatchGetUsersRequest {
                user_ids: chunk.to_vec(),
            };
            async move { users.batch_get_users(request).await }
        });
        let replies = try_join_all(calls).await?;
        Ok(replies
            .into_iter()
            .flat_map(|r| r.into_inner().users)
            .map(|u| (u.user_id.clone(), u))
            .collect())
    }
}

/// The page size to ask for: 0 means the default, above the maximum is capped.
fn comment_page_size(req: &GetPostThreadRequest) -> Result<i32, Status> {
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
    Ok(match req.comment_page_size {
        0 => DEFAULT_COMMENT_PAGE_SIZE,
        n => n.min(MAX_COMMENT_PAGE_SIZE),
    })
}

#[tonic::async_trait]
impl FeedService for Feed {
    async fn get_post_thread(
        &self,
        request: Request<GetPostThreadRequest>,
    ) -> Result<Response<GetPostThreadResponse>, Status> {
        // Downstream calls carry the caller's token (emails are shown to their owners) and
        // deadline. The mesh server stack and the public proxy set this context; wherever it
        // lacks the token, the verified user in the request has it.
        let mut ctx = context::current().unwrap_or_default();
        let user = maybe_end_user(&request);
        if ctx.token.is_none() {
            ctx.token = user.map(|u| u.token.clone());
        }
        let reader = match user {
            Some(u) if u.claims.is_admin() => Reader::Privileged,
            Some(u) => Reader::Owner(u.claims.sub.clone()),
            None if ctx.token.is_some() => Reader::Privileged,
            None => Reader::Anyone,
        };
        let req = request.into_inner();
        let page_size = comment_page_size(&req)?;
        let reply = context::scope(ctx, self.thread(req.post_id, page_size, &reader)).await?;
        Ok(Response::new(reply))
    }
}
