//! What the PostService tests share: services over fresh databases and short calls.

use tessera::{
    posts::v1::{
        CreatePostRequest, DeletePostRequest, GetPostRequest, ListPostsRequest, Post,
        UpdatePostRequest, post_service_server::PostService,
    },
    users::v1::{
        Role, User, user_service_client::UserServiceClient, user_service_server::UserServiceServer,
    },
};
use tessera_mesh::errors::violated_fields;
use tessera_posts::{MIGRATIONS, Posts};
use tessera_store::testing::{self, TestDb};
use tessera_testing::{as_user, fakes::FakeUsers};
use tonic::{Code, Request, Status};

/// A fresh service on SQLite, plus one on PostgreSQL when configured; keep the databases.
pub(crate) async fn services(label: &str) -> (Vec<Posts>, Vec<TestDb>) {
    let dbs = testing::databases(label, MIGRATIONS).await;
    let mut out = Vec::new();
    for t in &dbs {
        out.push(
            Posts::with_db(t.db.clone())
                .await
                .unwrap()
                .with_users(stored_roles()),
        );
    }
    (out, dbs)
}

/// UserService as it stands now: `mod` and `root` are what their tokens say; `stale` was
/// demoted to USER after its MODERATOR token was issued; `gone` was deleted (absent).
pub(crate) fn stored_roles() -> UserServiceClient<tessera_client::Channel> {
    let users = [
        ("mod", Role::Moderator),
        ("root", Role::Admin),
        ("stale", Role::User),
    ]
    .into_iter()
    .map(|(id, role)| {
        let user = User {
            user_id: id.into(),
            role: role as i32,
            ..User::default()
        };
        (id.to_owned(), user)
    })
    .collect();
    let fake = FakeUsers {
        users,
        ..FakeUsers::default()
    };
    UserServiceClient::new(tessera_client::Channel::from_service(
        UserServiceServer::new(fake),
    ))
}

pub(crate) fn draft(title: &str) -> CreatePostRequest {
    CreatePostRequest {
        title: title.into(),
        body: format!("body of {title}"),
        tags: vec!["rust".into(), "grpc".into()],
        request_id: String::new(),
    }
}

pub(crate) async fn create(svc: &Posts, author: &str, title: &str) -> Post {
    svc.create_post(as_user(author, "USER", draft(title)))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap()
}

pub(crate) async fn get(svc: &Posts, post_id: &str) -> Result<Post, Status> {
    svc.get_post(Request::new(GetPostRequest {
        post_id: post_id.into(),
    }))
    .await
    .map(|r| r.into_inner().post.unwrap())
}

pub(crate) async fn list(
    svc: &Posts,
    author_id: &str,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<Post>, String), Status> {
    svc.list_posts(Request::new(ListPostsRequest {
        author_id: author_id.into(),
        page_size,
        page_token: page_token.into(),
    }))
    .await
    .map(|r| {
        let r = r.into_inner();
        (r.posts, r.next_page_token)
    })
}

/// UpdatePost as `sub` with `role`.
pub(crate) async fn edit(
    svc: &Posts,
    sub: &str,
    role: &str,
    req: UpdatePostRequest,
) -> Result<Post, Status> {
    svc.update_post(as_user(sub, role, req))
        .await
        .map(|r| r.into_inner().post.unwrap())
}

/// DeletePost as `sub` with `role`.
pub(crate) async fn delete(
    svc: &Posts,
    sub: &str,
    role: &str,
    post_id: &str,
) -> Result<(), Status> {
    svc.delete_post(as_user(
        sub,
        role,
        DeletePostRequest {
            post_id: post_id.into(),
        },
    ))
    .await
    .map(drop)
}

pub(crate) fn update(post: &Post, paths: &[&str], etag: &str) -> UpdatePostRequest {
    UpdatePostRequest {
        post: Some(post.clone()),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        etag: etag.into(),
    }
}

pub(crate) fn assert_invalid(result: Result<impl std::fmt::Debug, Status>, field: &str) {
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
    assert!(
        violated_fields(&err).iter().any(|f| f == field),
        "{field} not in {:?}",
        violated_fields(&err)
    );
}
