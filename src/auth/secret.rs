//! Passwords (Argon2id) and access-token secrets (random, stored as SHA-256).

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A secret that never shows itself in Debug or Display output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the few places that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// A random string of `n` characters from [a-zA-Z0-9].
pub fn random_string(n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(n);
    while out.len() < n {
        for b in random_bytes::<64>() {
            // Reject the top of the range so every character is equally likely.
            if (b as usize) < 248 && out.len() < n {
                out.push(CHARS[b as usize % 62] as char);
            }
        }
    }
    out
}

pub fn random_key() -> [u8; 32] {
    random_bytes()
}

pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).expect("16 bytes encode");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashes")
        .to_string()
}

/// Checks `password` against a stored hash; the comparison is constant-time.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A password hash to compare against when the user does not exist, so that a missing
/// user costs as much time as a wrong password.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("no such user"))
}

pub const TOKEN_PREFIX: &str = "wharf_";

/// A new access token: (id, full token string, stored hash of the secret).
pub fn new_token() -> (String, Secret, String) {
    let id = random_string(12);
    let secret = random_string(40);
    let token = format!("{TOKEN_PREFIX}{id}_{secret}");
    (id, Secret(token), hash_token_secret(&secret))
}

pub fn hash_token_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits `wharf_<id>_<secret>`.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && !secret.is_empty()).then_some((id, secret))
}

/// Constant-time comparison of a presented secret with the stored hash.
pub fn token_secret_matches(secret: &str, stored_hash: &str) -> bool {
    hash_token_secret(secret)
        .as_bytes()
        .ct_eq(stored_hash.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords() {
        let h = hash_password("correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsE", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn tokens() {
        let (id, token, hash) = new_token();
        let (pid, secret) = parse_token(token.expose()).unwrap();
        assert_eq!(pid, id);
        assert!(token_secret_matches(secret, &hash));
        assert!(!token_secret_matches("wrong", &hash));
        assert!(parse_token("ghp_abc").is_none());
        assert!(parse_token("wharf_short_x").is_none());
        assert_eq!(format!("{token:?}"), "Secret(***)");
        assert!(!format!("{token:?}").contains(secret));
    }

    #[test]
    fn random_strings_are_alphanumeric_and_distinct() {
        let a = random_string(40);
        assert_eq!(a.len(), 40);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, random_string(40));
    }
}
