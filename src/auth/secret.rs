//! Passwords (Argon2id) and access-token secrets (random, stored as SHA-256).

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::PasswordHash;
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

/// Argon2id cost: OWASP's 7 MiB, 5 passes, one lane, which it rates as strong as its
/// 19 MiB, 2 passes: the server keeps one small working area instead of a large one.
const ARGON2_M_KIB: u32 = 7 * 1024;
const ARGON2_T: u32 = 5;
const ARGON2_P: u32 = 1;
const HASH_LEN: usize = 32;

/// Argon2's working memories, allocated once each and reused by every hash and check.
/// The server runs at most one check per password thread at a time (see `Auth`), so at most that
/// many exist; each fresh multi-MiB allocation would otherwise stay in the allocator's
/// arenas and grow the resident size with every burst of logins.
static WORK_AREAS: std::sync::Mutex<Vec<Vec<argon2::Block>>> = std::sync::Mutex::new(Vec::new());

fn argon2_raw(params: argon2::Params, password: &[u8], salt: &[u8], out: &mut [u8]) -> bool {
    let ctx = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let pool = || {
        WORK_AREAS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut area = pool().pop().unwrap_or_default();
    let blocks = ctx.params().block_count();
    if area.len() < blocks {
        area.resize(blocks, argon2::Block::default());
    }
    let ok = ctx
        .hash_password_into_with_memory(password, salt, out, &mut area[..blocks])
        .is_ok();
    let mut p = pool();
    if p.len() < crate::auth::parallelism().max(2) {
        p.push(area);
    }
    ok
}

/// A PHC string (`$argon2id$v=19$m=..,t=..,p=..$salt$hash`) for `password`.
pub fn hash_password(password: &str) -> String {
    let salt = random_bytes::<16>();
    let params = argon2::Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, Some(HASH_LEN))
        .expect("valid argon2 parameters");
    let mut out = [0u8; HASH_LEN];
    assert!(
        argon2_raw(params, password.as_bytes(), &salt, &mut out),
        "argon2 hashes"
    );
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    format!(
        "$argon2id$v=19$m={ARGON2_M_KIB},t={ARGON2_T},p={ARGON2_P}${}${}",
        base64::Engine::encode(&b64, salt),
        base64::Engine::encode(&b64, out)
    )
}

/// Checks `password` against a stored Argon2 PHC hash, whatever its cost parameters; the
/// comparison is constant-time.
pub fn verify_password(password: &str, hash: &str) -> bool {
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    if h.algorithm.as_str() != "argon2id" || h.version.is_some_and(|v| v != 0x13) {
        return false;
    }
    let (Ok(params), Some(salt), Some(expected)) = (argon2::Params::try_from(&h), h.salt, h.hash)
    else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    argon2_raw(params, password.as_bytes(), salt, &mut out)
        && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
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
    fn hashes_agree_with_the_argon2_crate_both_ways() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
        // A hash made by the crate's own API with its default (19 MiB) cost still verifies.
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let old = Argon2::default()
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("pw", &old));
        assert!(!verify_password("pW", &old));
        // And ours verifies with the crate's verifier.
        let ours = hash_password("pw");
        assert!(ours.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"));
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"px", &parsed).is_err());
        // Other algorithms are refused rather than checked with the wrong one.
        assert!(!verify_password("pw", &old.replace("argon2id", "argon2i")));
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
