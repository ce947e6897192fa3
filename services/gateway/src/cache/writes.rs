//! The write path: the public methods that change something the cache holds drop its key
//! once the owner has answered, before the answer goes back to the writer, so the writer's
//! next read through this gateway sees the write (the event may still be on its way).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use prost::Message;
use tessera::{
    posts::v1::{DeletePostRequest, UpdatePostRequest},
    users::v1::{DeleteUserRequest, SetUserRoleRequest},
};
use tessera_client::Channel;
use tonic::body::Body;
use tower::{BoxError, Service, ServiceExt};

use super::Cache;

/// The public methods that change a cached post or profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    UpdatePost,
    DeletePost,
    SetUserRole,
    DeleteUser,
}

impl Write {
    const ALL: [(&'static str, Write); 4] = [
        (
            "/tessera.posts.v1.PostService/UpdatePost",
            Write::UpdatePost,
        ),
        (
            "/tessera.posts.v1.PostService/DeletePost",
            Write::DeletePost,
        ),
        (
            "/tessera.users.v1.UserService/SetUserRole",
            Write::SetUserRole,
        ),
        (
            "/tessera.users.v1.UserService/DeleteUser",
            Write::DeleteUser,
        ),
    ];

    fn of(path: &str) -> Option<Self> {
        Self::ALL.iter().find(|(p, _)| *p == path).map(|(_, w)| *w)
    }

    /// The id the request names, from its one gRPC message; `None` when it cannot be read
    /// (compressed, malformed: the owner will say what is wrong with it).
    fn key(self, body: &[u8]) -> Option<String> {
        let mut frame = body;
        if frame.len() < 5 || frame.get_u8() != 0 {
            return None;
        }
        let len = frame.get_u32() as usize;
        let message = frame.get(..len)?;
        match self {
            Write::UpdatePost => UpdatePostRequest::decode(message)
                .ok()?
                .post
                .map(|p| p.post_id),
            Write::DeletePost => DeletePostRequest::decode(message).ok().map(|r| r.post_id),
            Write::SetUserRole => SetUserRoleRequest::decode(message).ok().map(|r| r.user_id),
            Write::DeleteUser => DeleteUserRequest::decode(message).ok().map(|r| r.user_id),
        }
    }

    fn invalidate(self, cache: &Cache, key: Option<&str>) {
        // Without the key, whatever it was is dropped with everything else.
        match (self, key) {
            (Write::UpdatePost | Write::DeletePost, Some(key)) => {
                cache.posts_part().invalidate(key)
            }
            (Write::UpdatePost | Write::DeletePost, None) => cache.posts_part().clear(),
            (Write::SetUserRole | Write::DeleteUser, Some(key)) => {
                cache.users_part().invalidate(key)
            }
            (Write::SetUserRole | Write::DeleteUser, None) => cache.users_part().clear(),
        }
    }
}

/// `channel` for the public method at `path`: when the method changes what `cache` holds,
/// wrapped so that the key it names is dropped once the owner has answered.
pub fn invalidating(path: &str, channel: Channel, cache: &Cache) -> Channel {
    match Write::of(path) {
        Some(write) => Channel::from_service(Invalidating {
            channel,
            cache: cache.clone(),
            write,
        }),
        None => channel,
    }
}

#[derive(Clone)]
struct Invalidating {
    channel: Channel,
    cache: Cache,
    write: Write,
}

impl Service<http::Request<Body>> for Invalidating {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The channel's readiness is checked per call, in `oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let Self {
            channel,
            cache,
            write,
        } = self.clone();
        Box::pin(async move {
            // The proxy has already read the one request message under its size limit.
            let (parts, body) = req.into_parts();
            let body: Bytes = body.collect().await?.to_bytes();
            let key = write.key(&body);
            let req = http::Request::from_parts(
                parts,
                Body::new(http_body_util::Full::new(body).map_err(|e: Infallible| match e {})),
            );
            let result = channel.oneshot(req).await;
            // A unary answer's headers come once the owner's handler has finished: the write
            // committed or failed. Dropping the key either way is safe.
            write.invalidate(&cache, key.as_deref());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::public_methods;

    fn framed(message: &impl Message) -> Vec<u8> {
        let encoded = message.encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        body
    }

    #[test]
    fn every_write_is_a_public_method() {
        // A renamed method would silently stop invalidating; this says so instead.
        let public: Vec<_> = public_methods()
            .unwrap()
            .into_iter()
            .map(|m| m.path)
            .collect();
        for (path, _) in Write::ALL {
            assert!(public.iter().any(|p| p == path), "{path} is not public");
        }
    }

    #[test]
    fn keys_come_from_the_request_message() {
        let delete = DeletePostRequest {
            post_id: "p1".into(),
        };
        assert_eq!(
            Write::DeletePost.key(&framed(&delete)).as_deref(),
            Some("p1")
        );
        let update = UpdatePostRequest {
            post: Some(tessera::posts::v1::Post {
                post_id: "p2".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Write::UpdatePost.key(&framed(&update)).as_deref(),
            Some("p2")
        );
        let role = SetUserRoleRequest {
            user_id: "u1".into(),
            role: 2,
        };
        assert_eq!(
            Write::SetUserRole.key(&framed(&role)).as_deref(),
            Some("u1")
        );

        let mut compressed = framed(&delete);
        compressed[0] = 1;
        assert_eq!(Write::DeletePost.key(&compressed), None);
        assert_eq!(
            Write::DeletePost.key(&[0, 0, 0, 0, 9, 1]),
            None,
            "truncated"
        );
        assert_eq!(Write::DeletePost.key(b""), None);
    }
}
