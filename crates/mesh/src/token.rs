//! End-user access tokens: compact EdDSA (Ed25519) JWTs, signed by the users service and
//! verified by every service that receives one (the network is never trusted).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ring::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey},
};
use serde::{Deserialize, Serialize};

/// How long a token is good for unless configured otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What a verified token says about the end user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    /// The user id.
    pub sub: String,
    /// `USER`, `MODERATOR` or `ADMIN`.
    pub role: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
}

impl UserClaims {
    /// Whether the role is `ADMIN`, the highest (an admin is a moderator too).
    pub fn is_admin(&self) -> bool {
        self.role == "ADMIN"
    }

    /// A moderator or an admin.
    pub fn is_moderator(&self) -> bool {
        self.role == "MODERATOR" || self.role == "ADMIN"
    }
}

/// The verified end user of a request, with the raw token so it can be forwarded downstream.
#[derive(Clone, Debug)]
pub struct EndUser {
    /// What the token says, checked: signature valid, not expired.
    pub claims: UserClaims,
    /// The token as received (without `Bearer `), for calls made on the user's behalf.
    pub token: Arc<str>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Why a token was refused or a key could not be used. Every token error means the same to
/// a caller (UNAUTHENTICATED); the variants are for logs and tests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON, or not an EdDSA token.
    #[error("the token is malformed")]
    Malformed,
    /// The header names a key id the verifier does not hold (perhaps a newer key).
    #[error("the token is signed with an unknown key")]
    UnknownKey,
    /// The signature does not verify: the token was altered or forged.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// Key material that is not an Ed25519 key (a PKCS#8 document or a JWK `x`).
    #[error("the signing key is invalid")]
    BadKey,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An Ed25519 signing key with its key id.
pub struct Signer {
    kid: String,
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl Signer {
    /// A new random key.
    pub fn generate() -> Result<Self, TokenError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| TokenError::BadKey)?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// Loads a key stored with [`Signer::pkcs8`]. The key id is derived from the public key,
    /// so it is stable across restarts.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| TokenError::BadKey)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let kid = B64.encode(&digest.as_ref()[..12]);
        Ok(Self {
            kid,
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The private key as a PKCS#8 document, to store and load back with
    /// [`Signer::from_pkcs8`]; a secret.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key id put in the header of every token this key signs, so verifiers pick the key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The public key as a JWK `x` member (base64url, no padding).
    pub fn public_key_b64(&self) -> String {
        B64.encode(self.public_key())
    }

    /// Signs a token for `sub` with `role`, valid for `ttl`.
    pub fn sign(&self, sub: &str, role: &str, ttl: Duration) -> (String, UserClaims) {
        let iat = now_secs();
        let claims = UserClaims {
            sub: sub.to_owned(),
            role: role.to_owned(),
            iat,
            exp: iat + ttl.as_secs(),
        };
        (self.sign_claims(&claims), claims)
    }

    /// Signs arbitrary claims (tests use it for expired tokens).
    pub fn sign_claims(&self, claims: &UserClaims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
            kid: self.kid.clone(),
        };
        // Serializing these plain structs cannot fail.
        let h = B64.encode(serde_json::to_vec(&header).unwrap_or_default());
        let c = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signing_input = format!("{h}.{c}");
        let sig = self.pair.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }
}

/// Public keys by key id; verifies tokens.
#[derive(Clone, Default, Debug)]
pub struct Verifier {
    keys: HashMap<String, Vec<u8>>,
}

impl Verifier {
    /// A verifier that knows no keys yet: it accepts no token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an Ed25519 public key given as raw bytes.
    pub fn add_key(&mut self, kid: &str, public_key: &[u8]) {
        self.keys.insert(kid.to_owned(), public_key.to_vec());
    }

    /// Adds a key given in JWK form (`x` is base64url).
    pub fn add_jwk(&mut self, kid: &str, x: &str) -> Result<(), TokenError> {
        let key = B64.decode(x).map_err(|_| TokenError::BadKey)?;
        if key.len() != 32 {
            return Err(TokenError::BadKey);
        }
        self.add_key(kid, &key);
        Ok(())
    }

    /// Whether no key has been added.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the set holds key `kid`; when not, a fresh key set may be worth fetching.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The raw public key of `kid`, if the set holds it.
    pub fn key(&self, kid: &str) -> Option<&[u8]> {
        self.keys.get(kid).map(Vec::as_slice)
    }

    /// The key id a token names, without verifying anything (to decide whether to refresh
    /// keys before verifying).
    pub fn peek_kid(token: &str) -> Result<String, TokenError> {
        let h = token.split('.').next().ok_or(TokenError::Malformed)?;
        let header: Header =
            serde_json::from_slice(&B64.decode(h).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        Ok(header.kid)
    }

    /// Checks the signature and expiry and returns the claims.
    pub fn verify(&self, token: &str) -> Result<UserClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header =
            serde_json::from_slice(&B64.decode(h).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Malformed);
        }
        let key = self.keys.get(&header.kid).ok_or(TokenError::UnknownKey)?;
        let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        let signing_input_len = h.len() + 1 + c.len();
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&token.as_bytes()[..signing_input_len], &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: UserClaims =
            serde_json::from_slice(&B64.decode(c).map_err(|_| TokenError::Malformed)?)
                .map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now_secs() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forgery() {
        let signer = Signer::generate().unwrap();
        let mut v = Verifier::new();
        v.add_jwk(signer.kid(), &signer.public_key_b64()).unwrap();
        let (tok, claims) = signer.sign("u1", "USER", DEFAULT_TOKEN_TTL);
        assert_eq!(v.verify(&tok).unwrap(), claims);
        assert_eq!(Verifier::peek_kid(&tok).unwrap(), signer.kid());

        // Same claims, another key claiming the same kid: rejected.
        let other = Signer::generate().unwrap();
        let forged = other.sign_claims(&claims);
        let forged = forged.replacen(
            forged.split('.').next().unwrap(),
            tok.split('.').next().unwrap(),
            1,
        );
        assert_eq!(v.verify(&forged), Err(TokenError::BadSignature));

        // Tampered claims: rejected.
        let mut parts: Vec<&str> = tok.split('.').collect();
        let admin = B64.encode(br#"{"sub":"u1","role":"ADMIN","exp":99999999999,"iat":0}"#);
        parts[1] = &admin;
        assert_eq!(v.verify(&parts.join(".")), Err(TokenError::BadSignature));

        let expired = signer.sign_claims(&UserClaims {
            exp: 1,
            ..claims.clone()
        });
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        assert_eq!(v.verify("garbage"), Err(TokenError::Malformed));
        assert_eq!(Verifier::new().verify(&tok), Err(TokenError::UnknownKey));
    }

    #[test]
    fn key_round_trips_through_pkcs8() {
        let a = Signer::generate().unwrap();
        let b = Signer::from_pkcs8(a.pkcs8()).unwrap();
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.public_key(), b.public_key());
    }
}
