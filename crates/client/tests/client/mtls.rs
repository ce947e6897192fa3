//! mTLS with workload certificates from files.

use std::time::Duration;

use tessera::users::v1::{GetUserRequest, user_service_client::UserServiceClient};
use tessera_client::ClientBuilder;
use tessera_mesh::{certs::Ca, tls::TlsSource};
use tessera_testing::tls::issue;
use tonic::Code;

use crate::support::{Replica, serial, target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_present_the_workload_certificate() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("tessera test CA").unwrap();
    let server = TlsSource::load(issue(&ca, "users", dir.path())).unwrap();
    let replica = Replica::start_mtls(server.mtls_server_config()).await;

    let builder =
        ClientBuilder::mtls_files(issue(&ca, "posts", dir.path()), Duration::from_secs(60))
            .unwrap()
            .connect_timeout(Duration::from_millis(500));
    let mut client = UserServiceClient::new(builder.channel(&target(&[&replica])).unwrap());
    let response = client
        .get_user(GetUserRequest {
            user_id: "u-7".into(),
        })
        .await
        .unwrap();
    assert_eq!(response.into_inner().user.unwrap().user_id, "u-7");
    assert_eq!(
        replica.behaviour.peer_identity.lock().unwrap().as_deref(),
        Some("spiffe://tessera.local/ns/default/sa/posts")
    );

    // A workload certificate from another CA gets no connection, so no call.
    let stranger = Ca::generate("another CA").unwrap();
    let builder = ClientBuilder::mtls_files(
        issue(&stranger, "intruder", dir.path()),
        Duration::from_secs(60),
    )
    .unwrap()
    .connect_timeout(Duration::from_millis(300));
    let mut client = UserServiceClient::new(builder.channel(&target(&[&replica])).unwrap());
    let gets = replica.behaviour.gets();
    let status = client
        .get_user(GetUserRequest {
            user_id: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(replica.behaviour.gets(), gets);
}
