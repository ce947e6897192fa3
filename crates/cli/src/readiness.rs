//! What a replica waits for before it reports ready: its upstream connections attempted and,
//! when it verifies end-user tokens with fetched keys, those keys in hand. Until then kubelet
//! (and anything else that reads readiness) keeps traffic away; the ports serve either way.

use std::time::Duration;

use tessera_client::Channel;
use tessera_mesh::auth::{KEY_WAIT, TokenKeys};

/// How long start-up waits for one upstream replica to be connected before going on without.
const UPSTREAM_WAIT: Duration = Duration::from_secs(2);

/// Resolves once every upstream was dialled (one replica each connected, or [`UPSTREAM_WAIT`]
/// passed) and the token keys are loaded. Keys that do not come within [`KEY_WAIT`] are
/// logged once, and fetching goes on in the background until they come.
pub(crate) async fn gate(keys: TokenKeys, upstreams: Vec<Channel>) {
    let connect = async {
        let mut attempts = tokio::task::JoinSet::new();
        for channel in upstreams {
            attempts.spawn(async move { channel.warm_up(UPSTREAM_WAIT).await });
        }
        let mut missing = 0usize;
        while let Some(connected) = attempts.join_next().await {
            if !matches!(connected, Ok(true)) {
                missing += 1;
            }
        }
        if missing > 0 {
            tracing::warn!(
                missing,
                wait = ?UPSTREAM_WAIT,
                "some upstreams have no replica connected yet; calls to them will keep trying"
            );
        }
    };
    let loaded = async {
        if keys.loaded() {
            return;
        }
        if tokio::time::timeout(KEY_WAIT, keys.until_loaded())
            .await
            .is_err()
        {
            tracing::warn!(
                wait = ?KEY_WAIT,
                "no token signing keys from users.GetJwks yet (is users reachable?): \
                 not ready until they arrive; still fetching"
            );
            keys.until_loaded().await;
            tracing::info!("token signing keys fetched");
        }
    };
    tokio::join!(connect, loaded);
}
