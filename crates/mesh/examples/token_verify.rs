//! What verifying an end-user token costs per call, for the token cache's figures:
//!
//! ```sh
//! cargo run --release -p tessera-mesh --example token_verify -- cached 20000
//! valgrind --tool=callgrind --toggle-collect='*measure*' \
//!     target/release/examples/token_verify uncached 2000
//! ```
//!
//! `uncached` is the path every call took before the cache (read the key id, check the
//! Ed25519 signature, decode the claims); `cached` is `TokenKeys::verify` of one token over
//! and over (the hops after the first); `first` is `TokenKeys::verify` of a new token each
//! time (a miss: the full check plus the cache insert). Under callgrind only `measure` is
//! counted, so the instructions divided by the count are the cost of one verification.

use std::time::{Duration, Instant};

use tessera_mesh::{
    auth::TokenKeys,
    token::{Signer, Verifier},
};

#[inline(never)]
async fn measure(mode: &str, keys: &TokenKeys, verifier: &Verifier, tokens: &[String]) -> usize {
    let mut ok = 0;
    for token in tokens {
        let verified = match mode {
            "uncached" => Verifier::peek_kid(token).and_then(|_| verifier.verify(token)),
            _ => keys.verify(token).await,
        };
        ok += usize::from(verified.is_ok());
    }
    ok
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Fixed keys never wait, so a single-threaded runtime is all `TokenKeys::verify` needs.
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "cached".into());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let signer = Signer::generate()?;
    let mut verifier = Verifier::new();
    verifier.add_key(signer.kid(), signer.public_key());
    let keys = TokenKeys::fixed(verifier.clone());
    let ttl = Duration::from_secs(900);
    let tokens: Vec<String> = match mode.as_str() {
        "first" => (0..count)
            .map(|i| signer.sign(&format!("user-{i}"), "USER", ttl).0)
            .collect(),
        "cached" | "uncached" => {
            let (token, _) = signer.sign("user-1", "USER", ttl);
            // The first verification fills the cache; what is measured are the hits after it.
            runtime.block_on(keys.verify(&token))?;
            vec![token; count]
        }
        other => {
            eprintln!("mode must be uncached, cached or first, not {other:?}");
            std::process::exit(64);
        }
    };
    let start = Instant::now();
    let ok = runtime.block_on(measure(&mode, &keys, &verifier, &tokens));
    let elapsed = start.elapsed();
    println!(
        "{mode}: {ok}/{count} verified, {:.2} µs per call",
        elapsed.as_secs_f64() * 1e6 / count.max(1) as f64
    );
    Ok(())
}
