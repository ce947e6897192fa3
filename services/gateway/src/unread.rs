//! Response bytes the gateway holds for clients that have not read them yet, counted per
//! client address.
//!
//! Reading upstream responses into the gateway frees the shared upstream connections, but
//! moves the bytes a slow or never-reading client leaves behind into the gateway's memory.
//! Each address may leave at most so many bytes unread at once, whatever number of
//! connections and streams it spreads them over; past that its next response is refused
//! (RESOURCE_EXHAUSTED) and its streams are cut off, and other addresses are not charged.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Unread bytes per client address, at most `per_address` each.
pub(crate) struct Ledger {
    per_address: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl Ledger {
    pub(crate) fn new(per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            per_address,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Charges `n` bytes to `ip` until the returned [`Charge`] is dropped; `None` when that
    /// would take the address past its allowance. Callers without an address are not
    /// counted (only the per-stream bounds apply to them).
    pub(crate) fn charge(self: &Arc<Self>, ip: Option<IpAddr>, n: usize) -> Option<Charge> {
        let Some(ip) = ip else {
            return Some(Charge {
                ledger: self.clone(),
                ip: None,
                n: 0,
            });
        };
        let ip = crate::rate_limit::address_key(ip);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let now = held.get(&ip).copied().unwrap_or(0);
        let after = now.saturating_add(n);
        if after > self.per_address {
            return None;
        }
        held.insert(ip, after);
        Some(Charge {
            ledger: self.clone(),
            ip: Some(ip),
            n,
        })
    }

    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&ip).copied().unwrap_or(0)
    }
}

/// Bytes charged to an address; given back when dropped (once the client has been handed
/// them, or they are thrown away).
pub(crate) struct Charge {
    ledger: Arc<Ledger>,
    ip: Option<IpAddr>,
    n: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut held = self.ledger.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = held.get_mut(&ip) {
            *v = v.saturating_sub(self.n);
            if *v == 0 {
                // Only addresses with bytes outstanding are kept.
                held.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_allowance_given_back_on_drop() {
        let ledger = Ledger::new(100);
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let first = ledger.charge(Some(a), 60);
        assert!(first.is_some());
        assert!(ledger.charge(Some(a), 60).is_none(), "past the allowance");
        assert_eq!(ledger.held(a), 60, "a refused charge takes nothing");
        assert!(ledger.charge(Some(b), 60).is_some(), "another address");
        assert!(
            ledger.charge(None, 1_000).is_some(),
            "no address, not counted"
        );
        drop(first);
        assert_eq!(ledger.held(a), 0);
        assert!(ledger.charge(Some(a), 100).is_some());
    }
}
