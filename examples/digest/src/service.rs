//! The DigestService implementation ([`Digest`]): validate, then read or write the digest's
//! own tables and call the upstreams through their typed clients.

use std::sync::Arc;

use tessera::{
    notifications::v1::{
        ListNotificationsRequest, notification_service_client::NotificationServiceClient,
    },
    posts::v1::{GetPostRequest, post_service_client::PostServiceClient},
};
use tessera_client::Channel;
use tessera_mesh::{auth::end_user, errors::Violations};
use tessera_store::Db;
use tonic::{Code, Request, Response, Status};

use crate::{
    Error, MIGRATIONS,
    v1::{
        FollowAuthorRequest, FollowAuthorResponse, GetDigestRequest, GetDigestResponse,
        digest_service_server::DigestService,
    },
};

/// The DigestService implementation. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Digest {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    posts: PostServiceClient<Channel>,
    notifications: NotificationServiceClient<Channel>,
}

impl Digest {
    /// Opens (creating and migrating if needed) the database at `target`, a SQLite path or a
    /// `postgres://` URL, and reads posts and notifications through the given clients.
    pub async fn open(
        target: &str,
        posts: PostServiceClient<Channel>,
        notifications: NotificationServiceClient<Channel>,
    ) -> Result<Digest, Error> {
        let db = Db::open(target, MIGRATIONS).await?;
        Ok(Self::with_migrated(db, posts, notifications))
    }

    /// Like [`Digest::open`] over an already connected database; runs [`MIGRATIONS`].
    pub async fn with_db(
        db: Db,
        posts: PostServiceClient<Channel>,
        notifications: NotificationServiceClient<Channel>,
    ) -> Result<Digest, Error> {
        db.migrate(MIGRATIONS).await?;
        Ok(Self::with_migrated(db, posts, notifications))
    }

    fn with_migrated(
        db: Db,
        posts: PostServiceClient<Channel>,
        notifications: NotificationServiceClient<Channel>,
    ) -> Digest {
        Digest {
            inner: Arc::new(Inner {
                db,
                posts,
                notifications,
            }),
        }
    }

    /// The service's database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }
}

/// GetDigest's page size when the request leaves it at 0, and the most it may ask for.
const DEFAULT_PAGE_SIZE: i32 = 20;
const MAX_PAGE_SIZE: i32 = 100;
/// User ids are short opaque strings; anything longer is not one.
const MAX_ID_LEN: usize = 128;

#[tonic::async_trait]
impl DigestService for Digest {
    async fn follow_author(
        &self,
        request: Request<FollowAuthorRequest>,
    ) -> Result<Response<FollowAuthorResponse>, Status> {
        let user_id = end_user(&request)?.claims.sub.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.check(req.author_id.is_empty(), "author_id", "is required");
        v.check(
            req.author_id.len() > MAX_ID_LEN,
            "author_id",
            "is longer than 128 bytes",
        );
        v.check(
            req.author_id == user_id,
            "author_id",
            "is the caller; your own posts are not in your digest",
        );
        v.into_result()?;
        // Following twice is following once: the call is IDEMPOTENT and retried as such.
        sqlx::query(
            "INSERT INTO follows (user_id, author_id) VALUES ($1, $2) \
             ON CONFLICT (user_id, author_id) DO NOTHING",
        )
        .bind(&user_id)
        .bind(&req.author_id)
        .execute(self.db().pool())
        .await
        .map_err(Error::from)?;
        Ok(Response::new(FollowAuthorResponse {}))
    }

    async fn get_digest(
        &self,
        request: Request<GetDigestRequest>,
    ) -> Result<Response<GetDigestResponse>, Status> {
        let user_id = end_user(&request)?.claims.sub.clone();
        let req = request.into_inner();
        let mut v = Violations::new();
        v.check(req.page_size < 0, "page_size", "must not be negative");
        v.check(
            req.page_size > MAX_PAGE_SIZE,
            "page_size",
            "must be at most 100",
        );
        v.into_result()?;
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n,
        };
        let ids: Vec<(String,)> = sqlx::query_as(
            "SELECT p.post_id FROM digest_posts p \
             JOIN follows f ON f.author_id = p.author_id \
             WHERE f.user_id = $1 \
             ORDER BY p.create_time DESC, p.post_id DESC LIMIT $2",
        )
        .bind(&user_id)
        .bind(i64::from(page_size))
        .fetch_all(self.db().pool())
        .await
        .map_err(Error::from)?;

        // The posts as they are now, through PostService (the deadline, token and trace of
        // this call go along); one deleted since its event arrived is left out.
        let mut posts = Vec::with_capacity(ids.len());
        let mut client = self.inner.posts.clone();
        for (post_id,) in ids {
            match client.get_post(GetPostRequest { post_id }).await {
                Ok(found) => posts.extend(found.into_inner().post),
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(Error::Upstream("PostService.GetPost", status).into()),
            }
        }
        let unread = self
            .inner
            .notifications
            .clone()
            .list_notifications(ListNotificationsRequest {
                page_size: 1,
                unread_only: true,
                ..Default::default()
            })
            .await
            .map_err(|status| Error::Upstream("NotificationService.ListNotifications", status))?
            .into_inner()
            .unread_count;
        Ok(Response::new(GetDigestResponse {
            posts,
            unread_notifications: unread,
        }))
    }
}
