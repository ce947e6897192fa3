//! Certificate rotation without a restart: new handshakes get the new certificate, open
//! connections keep working.

use std::time::Duration;

use tessera::posts::v1::{GetPostRequest, post_service_client::PostServiceClient};
use tessera_mesh::tls::TlsSource;

use crate::support::{
    Handshakes, connect, eventually, issue_server_cert, serial_of, spawn_app, spiffe,
};

fn get(id: &str) -> GetPostRequest {
    GetPostRequest { post_id: id.into() }
}

#[tokio::test]
async fn rotated_server_certificate_is_served_to_new_connections_only() {
    let app = spawn_app().await;
    let config = app.client_config("gateway");
    let old_serial = serial_of(&app.server_cert);

    let held_handshakes = Handshakes::default();
    let mut held = PostServiceClient::new(
        connect(app.grpc, config.clone(), &held_handshakes)
            .await
            .unwrap(),
    );
    held.get_post(get("before")).await.unwrap();
    assert_eq!(held_handshakes.serials(), std::slice::from_ref(&old_serial));

    // Rotate: a new certificate (new key, new serial) replaces the files in place.
    let rotated = issue_server_cert(&app.ca);
    let new_serial = serial_of(&rotated);
    assert_ne!(new_serial, old_serial);
    rotated.save(&app.server_dir).unwrap();

    // A new connection is served with the new certificate once the watcher has seen it.
    let fresh = Handshakes::default();
    eventually!(
        {
            let mut client =
                PostServiceClient::new(connect(app.grpc, config.clone(), &fresh).await.unwrap());
            client.get_post(get("after")).await.unwrap();
            fresh.serials().last() == Some(&new_serial)
        },
        "a new handshake to present the rotated certificate"
    );

    // The connection made before the rotation is still the same one and still serves.
    let got = held.get_post(get("still-here")).await.unwrap();
    assert_eq!(got.into_inner().post.unwrap().post_id, "still-here");
    assert_eq!(
        held_handshakes.serials(),
        [old_serial],
        "the held channel reconnected instead of keeping its connection"
    );
    assert!(!app.done.is_finished(), "the server restarted or stopped");
}

#[tokio::test]
async fn a_zero_reload_interval_still_reloads_instead_of_panicking() {
    let app = spawn_app().await;
    let files = app.client_files("gateway");
    let source = TlsSource::watch(files.clone(), Duration::ZERO).unwrap();
    assert_eq!(source.identity(), spiffe("gateway"));
    // Replace the files with another workload's; the watcher task is alive and picks it up.
    let next = app.client_files("comments");
    for (from, to) in [(&next.cert, &files.cert), (&next.key, &files.key)] {
        std::fs::copy(from, to).unwrap();
    }
    eventually!(
        source.identity() == spiffe("comments"),
        "the watcher to load the new certificate"
    );
}
