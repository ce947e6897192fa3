//! GetPostThread over fake services: results, downstream call counts, bad input.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tessera::{
    comments::v1::comment_service_client::CommentServiceClient,
    comments::v1::comment_service_server::CommentServiceServer,
    gateway::v1::{
        GetPostThreadRequest, feed_service_client::FeedServiceClient,
        feed_service_server::FeedServiceServer,
    },
    posts::v1::{
        Post, post_service_client::PostServiceClient, post_service_server::PostServiceServer,
    },
    users::v1::user_service_client::UserServiceClient,
    users::v1::user_service_server::UserServiceServer,
};
use tessera_client::Channel;
use tessera_gateway::Feed;
use tessera_mesh::errors::violated_fields;
use tonic::Code;

use crate::fakes::{Calls, FakeComments, FakePosts, FakeUsers, comment, user};

/// A post "p1" by "alice" with `n` comments by `authors(i)`; users exist unless `missing`.
fn feed_server(
    n: usize,
    authors: impl Fn(usize) -> String,
    missing: &[&str],
) -> (FeedServiceServer<Feed>, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let post = Post {
        post_id: "p1".into(),
        author_id: "alice".into(),
        title: "hello".into(),
        ..Default::default()
    };
    let comments: Vec<_> = (0..n).map(|i| comment(i, "p1", &authors(i))).collect();
    let mut users: HashMap<String, _> = comments
        .iter()
        .map(|c| (c.author_id.clone(), user(&c.author_id)))
        .collect();
    users.insert("alice".into(), user("alice"));
    for m in missing {
        users.remove(*m);
    }
    let posts = FakePosts {
        calls: calls.clone(),
        posts: Mutex::new(HashMap::from([("p1".to_owned(), post)])),
        ..FakePosts::default()
    };
    let comments = FakeComments {
        calls: calls.clone(),
        comments,
        ..FakeComments::default()
    };
    let users = FakeUsers {
        calls: calls.clone(),
        users,
        ..FakeUsers::default()
    };
    let feed = Feed::new(
        PostServiceClient::new(Channel::from_service(PostServiceServer::new(posts))),
        CommentServiceClient::new(Channel::from_service(CommentServiceServer::new(comments))),
        UserServiceClient::new(Channel::from_service(UserServiceServer::new(users))),
    );
    (FeedServiceServer::new(feed), calls)
}

fn feed(
    n: usize,
    authors: impl Fn(usize) -> String,
    missing: &[&str],
) -> (FeedServiceClient<Channel>, Arc<Calls>) {
    let (server, calls) = feed_server(n, authors, missing);
    (FeedServiceClient::new(Channel::from_service(server)), calls)
}

fn thread(post_id: &str, size: i32) -> GetPostThreadRequest {
    GetPostThreadRequest {
        post_id: post_id.into(),
        comment_page_size: size,
    }
}

#[tokio::test]
async fn thread_joins_post_comments_and_authors_in_three_calls() {
    // 30 comments by 7 authors, one of whom ("u3") has been deleted.
    let (mut client, calls) = feed(30, |i| format!("u{}", i % 7), &["u3"]);
    let reply = client
        .get_post_thread(thread("p1", 0))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(reply.post.unwrap().title, "hello");
    assert_eq!(reply.author.unwrap().user_id, "alice");
    assert_eq!(reply.comments.len(), 20, "default page size");
    assert_eq!(reply.next_comment_page_token, "next");
    for (i, tc) in reply.comments.iter().enumerate() {
        let c = tc.comment.as_ref().unwrap();
        assert_eq!(c.comment_id, format!("c{i}"), "order kept");
        match &tc.author {
            Some(a) => assert_eq!(a.user_id, c.author_id),
            None => assert_eq!(c.author_id, "u3", "only the deleted user is missing"),
        }
    }

    assert_eq!(Calls::get(&calls.get_post), 1);
    assert_eq!(Calls::get(&calls.list_comments), 1);
    assert_eq!(Calls::get(&calls.batch_get_users), 1);
    // alice + u0..u6, each once.
    assert_eq!(*calls.batch_sizes.lock().unwrap(), vec![8]);
}

#[tokio::test]
async fn a_full_page_of_distinct_authors_stays_bounded() {
    let (mut client, calls) = feed(150, |i| format!("u{i}"), &[]);
    let reply = client
        .get_post_thread(thread("p1", 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.comments.len(), 100, "capped at 100");
    assert!(reply.comments.iter().all(|c| c.author.is_some()));
    // 101 distinct users: two batches at most, none above the limit, not one per comment.
    let sizes = calls.batch_sizes.lock().unwrap().clone();
    assert!(sizes.len() <= 2, "{sizes:?}");
    assert!(sizes.iter().all(|&s| s <= 100), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 101);
    assert_eq!(Calls::get(&calls.get_post), 1);
    assert_eq!(Calls::get(&calls.list_comments), 1);
}

#[tokio::test]
async fn a_thread_without_comments_still_has_its_author() {
    let (mut client, calls) = feed(0, |_| String::new(), &[]);
    let reply = client
        .get_post_thread(thread("p1", 5))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.comments.is_empty());
    assert!(reply.next_comment_page_token.is_empty());
    assert_eq!(reply.author.unwrap().user_id, "alice");
    assert_eq!(*calls.batch_sizes.lock().unwrap(), vec![1]);
}

#[tokio::test]
async fn bad_input_is_rejected_before_any_downstream_call() {
    let cases = [
        (thread("", 0), Code::InvalidArgument, vec!["post_id"]),
        (thread("  ", 0), Code::InvalidArgument, vec!["post_id"]),
        (
            thread("p1", -1),
            Code::InvalidArgument,
            vec!["comment_page_size"],
        ),
        (
            thread("", -5),
            Code::InvalidArgument,
            vec!["post_id", "comment_page_size"],
        ),
    ];
    for (req, code, fields) in cases {
        let (mut client, calls) = feed(3, |i| format!("u{i}"), &[]);
        let err = client.get_post_thread(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}");
        assert_eq!(violated_fields(&err), fields, "{req:?}");
        assert_eq!(Calls::get(&calls.get_post), 0);
        assert_eq!(Calls::get(&calls.list_comments), 0);
        assert_eq!(Calls::get(&calls.batch_get_users), 0);
    }
}

#[tokio::test]
async fn a_missing_post_is_not_found() {
    let (mut client, calls) = feed(3, |i| format!("u{i}"), &[]);
    let err = client.get_post_thread(thread("nope", 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(Calls::get(&calls.batch_get_users), 0);
}

#[tokio::test]
async fn the_feed_is_served_through_the_public_proxy() {
    use std::collections::HashMap;

    use tessera_gateway::{PublicProxy, RateLimits};
    use tessera_mesh::{
        auth::TokenKeys,
        token::{DEFAULT_TOKEN_TTL, Signer, Verifier},
    };

    let (server, calls) = feed_server(3, |i| format!("u{i}"), &[]);
    let signer = Signer::generate().unwrap();
    let mut verifier = Verifier::new();
    verifier.add_key(signer.kid(), signer.public_key());
    let proxy = PublicProxy::new(
        HashMap::from([(
            "/tessera.gateway.v1.FeedService/GetPostThread".to_owned(),
            Channel::from_service(server),
        )]),
        TokenKeys::fixed(verifier),
        RateLimits::default(),
    )
    .unwrap();
    let mut client = FeedServiceClient::new(Channel::from_service(proxy));

    // Anonymous is fine (the rule has no `user: true`) ...
    let reply = client
        .get_post_thread(thread("p1", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.comments.len(), 3);
    // ... and so is a valid token; a forged one is not.
    let (token, _) = signer.sign("u1", "USER", DEFAULT_TOKEN_TTL);
    let mut req = tonic::Request::new(thread("p1", 0));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.get_post_thread(req).await.unwrap();
    let forged = Signer::generate()
        .unwrap()
        .sign("u1", "ADMIN", DEFAULT_TOKEN_TTL)
        .0;
    let mut req = tonic::Request::new(thread("p1", 0));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {forged}").parse().unwrap());
    let err = client.get_post_thread(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(Calls::get(&calls.get_post), 2);
}
