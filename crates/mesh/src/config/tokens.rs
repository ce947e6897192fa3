//! The settings of end-user tokens and the keys that sign them (users service).

use std::{path::PathBuf, time::Duration};

use super::{ConfigError, non_empty};

/// Access tokens live minutes: they cannot be revoked, so this bounds how long a role change
/// or a deletion takes to reach a token already issued.
pub const DEFAULT_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Refresh tokens live 30 days from their issue (each rotation issues a new one).
pub const DEFAULT_REFRESH_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A new signing key a day.
pub const DEFAULT_SIGNING_KEY_ROTATION: Duration = Duration::from_secs(24 * 3600);
/// An access token longer-lived than a day is not short-lived.
pub const MAX_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(MAX_ACCESS_TOKEN_TTL_S);
const MAX_ACCESS_TOKEN_TTL_S: u64 = 24 * 3600;

/// `TESSERA_ACCESS_TOKEN_TTL_S`, `TESSERA_REFRESH_TOKEN_TTL_S`,
/// `TESSERA_SIGNING_KEY_ROTATION_S`, `TESSERA_KEY_ENCRYPTION_KEY_FILE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    /// How long an access token is accepted after its issue; at most [`MAX_ACCESS_TOKEN_TTL`].
    pub access_token_ttl: Duration,
    /// How long a refresh token can be exchanged for new tokens after its issue.
    pub refresh_token_ttl: Duration,
    /// How often a new signing key takes over (the old one still verifies until the tokens
    /// it signed have expired).
    pub signing_key_rotation: Duration,
    /// The 32-byte key that encrypts signing keys at rest (a mounted Secret). Unset: the
    /// data directory's generated `key-encryption.key` (SQLite only).
    pub key_encryption_key_file: Option<PathBuf>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            access_token_ttl: DEFAULT_ACCESS_TOKEN_TTL,
            refresh_token_ttl: DEFAULT_REFRESH_TOKEN_TTL,
            signing_key_rotation: DEFAULT_SIGNING_KEY_ROTATION,
            key_encryption_key_file: None,
        }
    }
}

/// Whole seconds, from `min` to `max`.
fn seconds(
    lookup: &dyn Fn(&str) -> Option<String>,
    key: &str,
    default: Duration,
    (min, max): (u64, u64),
) -> Result<Duration, ConfigError> {
    let Some(raw) = non_empty(lookup, key) else {
        return Ok(default);
    };
    match raw.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(ConfigError::new(
            key,
            format!("expected whole seconds from {min} to {max}, got {raw:?}"),
        )),
    }
}

impl TokenSettings {
    /// Reads the token settings through `lookup`, the defaults for unset ones; a value out of
    /// its range is an error naming the setting.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // Ten years: beyond that a timestamp computation is the likelier outcome than intent.
        const DECADE: u64 = 10 * 365 * 24 * 3600;
        let d = Self::default();
        let settings = Self {
            access_token_ttl: seconds(
                lookup,
                "TESSERA_ACCESS_TOKEN_TTL_S",
                d.access_token_ttl,
                (1, MAX_ACCESS_TOKEN_TTL_S),
            )?,
            refresh_token_ttl: seconds(
                lookup,
                "TESSERA_REFRESH_TOKEN_TTL_S",
                d.refresh_token_ttl,
                (1, DECADE),
            )?,
            signing_key_rotation: seconds(
                lookup,
                "TESSERA_SIGNING_KEY_ROTATION_S",
                d.signing_key_rotation,
                // Each key is kept until its tokens expire: rotating faster than a minute
                // would pile up keys for nothing.
                (60, DECADE),
            )?,
            key_encryption_key_file: non_empty(lookup, "TESSERA_KEY_ENCRYPTION_KEY_FILE")
                .map(PathBuf::from),
        };
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<TokenSettings, ConfigError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TokenSettings::from_lookup(&move |k| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(from(&[]).unwrap(), TokenSettings::default());
        let s = from(&[
            ("TESSERA_ACCESS_TOKEN_TTL_S", "60"),
            ("TESSERA_REFRESH_TOKEN_TTL_S", "3600"),
            ("TESSERA_SIGNING_KEY_ROTATION_S", "7200"),
            (
                "TESSERA_KEY_ENCRYPTION_KEY_FILE",
                "/var/run/secrets/kek/key",
            ),
        ])
        .unwrap();
        assert_eq!(s.access_token_ttl, Duration::from_secs(60));
        assert_eq!(s.refresh_token_ttl, Duration::from_secs(3600));
        assert_eq!(s.signing_key_rotation, Duration::from_secs(7200));
        assert_eq!(
            s.key_encryption_key_file,
            Some(PathBuf::from("/var/run/secrets/kek/key"))
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (key, value) in [
            ("TESSERA_ACCESS_TOKEN_TTL_S", "0"),
            ("TESSERA_ACCESS_TOKEN_TTL_S", "-5"),
            ("TESSERA_ACCESS_TOKEN_TTL_S", "86401"),
            ("TESSERA_ACCESS_TOKEN_TTL_S", "15m"),
            ("TESSERA_REFRESH_TOKEN_TTL_S", "0"),
            ("TESSERA_REFRESH_TOKEN_TTL_S", "1.5"),
            ("TESSERA_SIGNING_KEY_ROTATION_S", "0"),
            ("TESSERA_SIGNING_KEY_ROTATION_S", "59"),
            ("TESSERA_SIGNING_KEY_ROTATION_S", "99999999999999999999"),
        ] {
            let err = from(&[(key, value)]).unwrap_err();
            assert_eq!(err.setting, key, "{value}");
        }
    }
}
