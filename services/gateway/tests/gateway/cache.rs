//! The cache behind `public_service_cached`, over fake upstreams whose WatchEvents the tests
//! feed: what a second read costs, that events and writes through the gateway reach readers,
//! that a stopped follower means no cache, and that emails never leave the cache.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prost::Message;
use tessera::{
    comments::v1::comment_service_server::CommentServiceServer,
    gateway::v1::{
        GetPostThreadRequest, GetPostThreadResponse, feed_service_client::FeedServiceClient,
    },
    posts::v1::{
        DeletePostRequest, Post, PostUpdated, UpdatePostRequest, WatchEventsResponse as PostEvent,
        post_service_client::PostServiceClient, post_service_server::PostServiceServer,
        watch_events_response::Event as PostKind,
    },
    users::v1::{
        User, UserUpdated, WatchEventsResponse as UserEvent,
        user_service_client::UserServiceClient, user_service_server::UserServiceServer,
        watch_events_response::Event as UserKind,
    },
};
use tessera_client::Channel;
use tessera_gateway::{
    Cache, CacheLimits, EdgeLimits, Upstreams,
    cache::{follow_post_events, follow_user_events},
    public_service_cached,
};
use tessera_mesh::{
    auth::TokenKeys,
    token::{DEFAULT_TOKEN_TTL, Signer, Verifier},
};
use tokio::sync::watch;
use tonic::{Code, Request, Status};

use crate::fakes::{Calls, FakeComments, FakePosts, FakeUsers, comment};

/// How long a test waits for the followers or an event; far above what they need.
const BOUND: Duration = Duration::from_secs(10);

struct Setup {
    public: Channel,
    cache: Cache,
    posts: Arc<FakePosts>,
    users: Arc<FakeUsers>,
    calls: Arc<Calls>,
    signer: Signer,
    stop: watch::Sender<bool>,
}

fn profile(id: &str) -> User {
    User {
        user_id: id.into(),
        username: id.into(),
        display_name: format!("{id} display"),
        // The fake shows it to everyone; the cache must not.
        email: format!("{id}@example.com"),
        ..Default::default()
    }
}

/// Post "p1" by alice with one comment by bob; both followers running and live.
async fn setup() -> Setup {
    let calls = Arc::new(Calls::default());
    let posts = Arc::new(FakePosts {
        calls: calls.clone(),
        posts: Mutex::new(HashMap::from([(
            "p1".to_owned(),
            Post {
                post_id: "p1".into(),
                author_id: "alice".into(),
                title: "hello".into(),
                ..Default::default()
            },
        )])),
        ..FakePosts::default()
    });
    let users = Arc::new(FakeUsers {
        calls: calls.clone(),
        users: HashMap::from([
            ("alice".to_owned(), profile("alice")),
            ("bob".to_owned(), profile("bob")),
        ]),
        ..FakeUsers::default()
    });
    let comments = FakeComments {
        calls: calls.clone(),
        comments: vec![comment(0, "p1", "bob")],
        ..FakeComments::default()
    };
    let posts_channel = Channel::from_service(PostServiceServer::from_arc(posts.clone()));
    let users_channel = Channel::from_service(UserServiceServer::from_arc(users.clone()));
    let comments_channel = Channel::from_service(CommentServiceServer::new(comments));
    let mut upstreams = Upstreams::new();
    upstreams.insert("posts", posts_channel.clone(), posts_channel.clone());
    upstreams.insert("users", users_channel.clone(), users_channel.clone());
    upstreams.insert("comments", comments_channel.clone(), comments_channel);

    let cache = Cache::new(CacheLimits::default());
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(follow_post_events(
        cache.clone(),
        PostServiceClient::new(posts_channel),
        stopped.clone(),
    ));
    tokio::spawn(follow_user_events(
        cache.clone(),
        UserServiceClient::new(users_channel),
        stopped,
    ));
    let signer = Signer::generate().unwrap();
    let mut verifier = Verifier::new();
    verifier.add_key(signer.kid(), signer.public_key());
    let service = public_service_cached(
        &upstreams,
        TokenKeys::fixed(verifier),
        EdgeLimits::default(),
        &cache,
    )
    .unwrap();
    let setup = Setup {
        public: Channel::from_service(service),
        cache,
        posts,
        users,
        calls,
        signer,
        stop,
    };
    until("the followers are live", || {
        setup.cache.posts_live() && setup.cache.users_live()
    })
    .await;
    setup
}

/// Polls `check` every few milliseconds until it holds; fails the test after [`BOUND`].
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !check() {
        assert!(Instant::now() < deadline, "not so within {BOUND:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Setup {
    fn token(&self, user: &str, role: &str) -> String {
        self.signer.sign(user, role, DEFAULT_TOKEN_TTL).0
    }

    /// The thread of p1, as `token`'s user or anonymously.
    async fn thread(&self, token: Option<&str>) -> Result<GetPostThreadResponse, Status> {
        let mut req = Request::new(GetPostThreadRequest {
            post_id: "p1".into(),
            comment_page_size: 0,
        });
        if let Some(token) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut feed = FeedServiceClient::new(self.public.clone());
        Ok(feed.get_post_thread(req).await?.into_inner())
    }

    fn title(&self) -> String {
        self.posts.posts.lock().unwrap()["p1"].title.clone()
    }

    /// Edits p1 at the owner, as its handler would, without telling the gateway.
    fn edit(&self, title: &str) {
        self.posts
            .posts
            .lock()
            .unwrap()
            .get_mut("p1")
            .unwrap()
            .title = title.into();
    }

    fn push_post_event(&self, sequence: i64, event: Option<PostKind>) {
        self.posts.log.push(PostEvent {
            sequence,
            event,
            ..Default::default()
        });
    }
}

fn title(reply: &GetPostThreadResponse) -> &str {
    &reply.post.as_ref().unwrap().title
}

#[tokio::test]
async fn a_second_read_costs_one_call_and_answers_the_same_bytes() {
    let s = setup().await;
    let first = s.thread(None).await.unwrap();
    let second = s.thread(None).await.unwrap();
    assert_eq!(Calls::get(&s.calls.get_post), 1);
    assert_eq!(Calls::get(&s.calls.batch_get_users), 1);
    assert_eq!(
        Calls::get(&s.calls.list_comments),
        2,
        "comments are not cached"
    );
    let stats = s.cache.stats();
    assert_eq!((stats.post_hits, stats.post_misses), (1, 1));
    assert_eq!((stats.user_hits, stats.user_misses), (2, 2));
    // The fake shows emails to anyone, which the first answer passes on; apart from that,
    // the answer from the cache is the answer from the owners.
    let public = |mut reply: GetPostThreadResponse| {
        reply.author.as_mut().unwrap().email.clear();
        reply.comments[0].author.as_mut().unwrap().email.clear();
        reply.encode_to_vec()
    };
    assert_eq!(public(first), second.encode_to_vec());
}

#[tokio::test]
async fn an_owners_event_reaches_the_next_reads() {
    let s = setup().await;
    assert_eq!(title(&s.thread(None).await.unwrap()), "hello");
    s.edit("edited elsewhere");
    // Not told yet: the cached post is still served.
    assert_eq!(title(&s.thread(None).await.unwrap()), "hello");
    let post = s.posts.posts.lock().unwrap()["p1"].clone();
    s.push_post_event(
        1,
        Some(PostKind::PostUpdated(PostUpdated { post: Some(post) })),
    );
    until("the event is applied", || {
        Calls::get(&s.calls.get_post) == 1
            && !matches!(s.cache.post("p1"), tessera_gateway::cache::Lookup::Hit(_))
    })
    .await;
    assert_eq!(title(&s.thread(None).await.unwrap()), "edited elsewhere");

    // A profile's event drops it too: the next read asks UserService for alice again.
    let before = Calls::get(&s.calls.batch_get_users);
    s.thread(None).await.unwrap();
    assert_eq!(
        Calls::get(&s.calls.batch_get_users),
        before,
        "both authors cached"
    );
    s.users.log.push(UserEvent {
        sequence: 1,
        event: Some(UserKind::UserUpdated(UserUpdated {
            user: Some(profile("alice")),
        })),
        ..Default::default()
    });
    until("the user event is applied", || {
        !matches!(
            s.cache.user("alice"),
            tessera_gateway::cache::Lookup::Hit(_)
        )
    })
    .await;
    s.thread(None).await.unwrap();
    assert_eq!(Calls::get(&s.calls.batch_get_users), before + 1);
    assert_eq!(
        *s.calls.batch_sizes.lock().unwrap().last().unwrap(),
        1,
        "only alice"
    );

    // A progress marker (a response without an event: the owner passed kinds this gateway
    // did not ask for) changes nothing. The event after it drops bob, and alice, fetched again
    // above, is still cached then: the marker was read first and emptied nothing.
    s.users.log.push(UserEvent {
        sequence: 2,
        ..Default::default()
    });
    s.users.log.push(UserEvent {
        sequence: 3,
        event: Some(UserKind::UserUpdated(UserUpdated {
            user: Some(profile("bob")),
        })),
        ..Default::default()
    });
    until("the event after the marker is applied", || {
        !matches!(s.cache.user("bob"), tessera_gateway::cache::Lookup::Hit(_))
    })
    .await;
    assert!(matches!(
        s.cache.user("alice"),
        tessera_gateway::cache::Lookup::Hit(_)
    ));
}

#[tokio::test]
async fn a_write_through_the_gateway_is_read_back_at_once() {
    let s = setup().await;
    let alice = s.token("alice", "USER");
    assert_eq!(title(&s.thread(Some(&alice)).await.unwrap()), "hello");

    // The fake has no UpdatePost: the edit is made in its store, and the call only takes
    // the gateway's write path (it answers UNIMPLEMENTED, after which the key is dropped all
    // the same). No event follows.
    s.edit("edited by alice");
    let mut posts = PostServiceClient::new(s.public.clone());
    let mut update = Request::new(UpdatePostRequest {
        post: Some(Post {
            post_id: "p1".into(),
            title: s.title(),
            ..Default::default()
        }),
        ..Default::default()
    });
    update
        .metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    assert_eq!(
        posts.update_post(update).await.unwrap_err().code(),
        Code::Unimplemented
    );
    assert_eq!(
        title(&s.thread(Some(&alice)).await.unwrap()),
        "edited by alice"
    );

    // The same for a deletion.
    s.posts.posts.lock().unwrap().remove("p1");
    let mut delete = Request::new(DeletePostRequest {
        post_id: "p1".into(),
    });
    delete
        .metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    posts.delete_post(delete).await.unwrap_err();
    assert_eq!(
        s.thread(Some(&alice)).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn emails_are_never_served_from_the_cache() {
    let s = setup().await;
    let (alice, bob) = (s.token("alice", "USER"), s.token("bob", "USER"));
    // Anonymous and bob fill the cache with alice's public view.
    s.thread(None).await.unwrap();
    s.thread(Some(&bob)).await.unwrap();
    assert!(
        matches!(s.cache.user("alice"), tessera_gateway::cache::Lookup::Hit(u) if u.email.is_empty())
    );

    let anonymous = s.thread(None).await.unwrap();
    assert_eq!(anonymous.author.unwrap().email, "");
    assert_eq!(anonymous.comments[0].author.as_ref().unwrap().email, "");

    // Bob sees his own email (fetched), and not alice's (cached).
    let as_bob = s.thread(Some(&bob)).await.unwrap();
    assert_eq!(as_bob.author.unwrap().email, "");
    assert_eq!(
        as_bob.comments[0].author.as_ref().unwrap().email,
        "bob@example.com"
    );
    // Alice sees hers although the cache holds her public view.
    let as_alice = s.thread(Some(&alice)).await.unwrap();
    assert_eq!(as_alice.author.unwrap().email, "alice@example.com");
    assert_eq!(as_alice.comments[0].author.as_ref().unwrap().email, "");

    // An ADMIN's read takes nothing from the cache (the owner decides what it shows).
    let admin = s.token("root", "ADMIN");
    let before = Calls::get(&s.calls.batch_get_users);
    let as_admin = s.thread(Some(&admin)).await.unwrap();
    assert_eq!(Calls::get(&s.calls.batch_get_users), before + 1);
    assert_eq!(*s.calls.batch_sizes.lock().unwrap().last().unwrap(), 2);
    assert_eq!(as_admin.author.unwrap().email, "alice@example.com");
}

#[tokio::test]
async fn without_its_follower_the_cache_is_not_used() {
    let s = setup().await;
    s.thread(None).await.unwrap();
    s.thread(None).await.unwrap();
    assert_eq!(Calls::get(&s.calls.get_post), 1);

    s.stop.send(true).unwrap();
    until("the followers stop", || {
        !s.cache.posts_live() && !s.cache.users_live()
    })
    .await;
    s.edit("changed while nobody listened");
    assert_eq!(
        title(&s.thread(None).await.unwrap()),
        "changed while nobody listened"
    );
    s.thread(None).await.unwrap();
    assert_eq!(
        Calls::get(&s.calls.get_post),
        3,
        "every read goes to the owner"
    );
}
