//! Shutdown signalling: a trigger that flips once, observed by every server of a workload.

use tokio::sync::watch;

/// Fires the shutdown. Dropping it without firing leaves the watchers waiting forever.
#[derive(Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Observes the shutdown trigger; cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A trigger and its first observer, not fired yet; clone the observer for each server.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Resolves once the trigger fires (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means the trigger was dropped: treat it as a shutdown.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// The underlying receiver, for components that take a `watch::Receiver<bool>`.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}

impl ShutdownTrigger {
    /// Starts the shutdown for every observer, now and later; firing again does nothing more.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
