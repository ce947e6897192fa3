//! `tessera.gateway.v1.FeedService`: views composed from the internal services.
//!
//! GetPostThread makes three downstream calls whatever the size of the page (more only when
//! the authors exceed one BatchGetUsers batch, at most two batches for the largest page):
//! GetPost and ListComments run concurrently, as both need only the post id, then one
//! BatchGetUsers fetches the post's author and every comment author together. A NOT_FOUND
//! from GetPost is the answer for a missing post.

use std::collections::{HashMap, HashSet};

use futures::future::try_join_all;
use tessera::{
    comments::v1::{ListCommentsRequest, comment_service_client::CommentServiceClient},
    gateway::v1::{
        GetPostThreadRequest, GetPostThreadResponse, ThreadComment,
        feed_service_server::FeedService,
    },
    posts::v1::{GetPostRequest, post_service_client::PostServiceClient},
    users::v1::{BatchGetUsersRequest, User, user_service_client::UserServiceClient},
};
use tessera_client::Channel;
use tessera_mesh::{auth::maybe_end_user, context, errors::Violations};
use tonic::{Request, Response, Status};

use crate::Error;

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
}

impl Feed {
    pub fn new(
        posts: PostServiceClient<Channel>,
        comments: CommentServiceClient<Channel>,
        users: UserServiceClient<Channel>,
    ) -> Self {
        Self {
            posts,
            comments,
            users,
        }
    }

    async fn thread(
        &self,
        post_id: String,
        page_size: i32,
    ) -> Result<GetPostThreadResponse, Error> {
        let mut posts = self.posts.clone();
        let mut comments = self.comments.clone();
        let (post, page) = tokio::try_join!(
            posts.get_post(GetPostRequest {
                post_id: post_id.clone()
            }),
            comments.list_comments(ListCommentsRequest {
                post_id,
                page_size,
                page_token: String::new(),
            }),
        )?;
        let post = post
            .into_inner()
            .post
            .ok_or_else(|| Error::Internal("GetPost returned no post".into()))?;
        let page = page.into_inner();

        // The post's author first, then each comment author once, in order of appearance.
        let mut seen = HashSet::new();
        let ids: Vec<String> = std::iter::once(&post.author_id)
            .chain(page.comments.iter().map(|c| &c.author_id))
            .filter(|id| !id.is_empty() && seen.insert(id.as_str()))
            .cloned()
            .collect();
        let users = self.batch_get_users(ids).await?;

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
        if ctx.token.is_none() {
            ctx.token = maybe_end_user(&request).map(|u| u.token.clone());
        }
        let req = request.into_inner();
        let page_size = comment_page_size(&req)?;
        let reply = context::scope(ctx, self.thread(req.post_id, page_size)).await?;
        Ok(Response::new(reply))
    }
}
