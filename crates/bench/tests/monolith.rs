//! The monolith baseline answers GetPostThread and CreatePost exactly as the mesh does, on a
//! tiny seeded dataset; and the comparison notices when they do not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use tessera::posts::v1::{CreatePostRequest, post_service_client::PostServiceClient};
use tessera_bench::{
    client::{Pool, Security},
    compare::{Sample, compare},
    monolith::Monolith,
    scenario_b::{copy_files, login_all, sample, seed},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolith_answers_like_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mesh");
    let mono_data = dir.path().join("monolith");
    let dataset = seed(&data, 4, 8, 30).await.unwrap();
    copy_files(&data, &mono_data).unwrap();

    let mesh = tessera_cli::up::start_mesh(&data, 0, None, |_, _| {})
        .await
        .unwrap();
    let public = mesh.addrs["gateway"].2.expect("the gateway's public port");
    let security = Security::server_only(&mesh.certs_dir.join("ca.crt")).unwrap();

    let monolith = Monolith::open(&mono_data).await.unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let mono_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tls_dir = mesh.certs_dir.join("gateway");
    let served = {
        let monolith = monolith.clone();
        tokio::spawn(async move { monolith.serve(listener, &tls_dir, stopped).await })
    };

    let pool = Pool::connect(public, &security, 2, &[]).await.unwrap();
    let mono_pool = Pool::connect(mono_addr, &security, 2, &[]).await.unwrap();
    let tokens = login_all(&pool, &dataset.users).await.unwrap();

    let same = compare(&pool, &mono_pool, &sample(&dataset, &tokens, 8)).await;
    assert_eq!(same.thread.mismatches, 0, "{:?}", same.thread.examples);
    assert_eq!(same.create.mismatches, 0, "{:?}", same.create.examples);
    // Anonymous reads of the sample plus reads by each post's own author.
    assert_eq!(same.thread.compared, 16);
    assert!(same.create.compared >= 1);

    // A post only the monolith has: the mesh answers NOT_FOUND, which must count.
    let conn = mono_pool.get(0).clone();
    let origin = conn.origin();
    let mut client = PostServiceClient::with_origin(conn, origin);
    let only_here = client
        .create_post(create_post(Some(&tokens[0])))
        .await
        .unwrap()
        .into_inner()
        .post
        .unwrap()
        .post_id;
    let differs = compare(
        &pool,
        &mono_pool,
        &Sample {
            threads: vec![(only_here, None)],
            creates: vec![],
        },
    )
    .await;
    assert_eq!(differs.thread.mismatches, 1);

    // The monolith's one token check: a forged token is refused, and so is a write without one.
    let forged = format!("{}x", tokens[0]);
    for token in [Some(forged.as_str()), None] {
        let refused = client.create_post(create_post(token)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{token:?}");
    }

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    monolith.close().await;
    mesh.shutdown().await.unwrap();
}

fn create_post(token: Option<&str>) -> tonic::Request<CreatePostRequest> {
    let mut req = tonic::Request::new(CreatePostRequest {
        title: "Only here".into(),
        body: "Written to the monolith alone.".into(),
        tags: vec![],
        request_id: String::new(),
    });
    if let Some(token) = token {
        let bearer = format!("Bearer {token}").parse().unwrap();
        req.metadata_mut().insert("authorization", bearer);
    }
    req
}
