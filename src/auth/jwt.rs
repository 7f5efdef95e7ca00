//! Registry tokens: JWTs signed with HMAC-SHA256 under a key only this registry holds.
//! Clients treat them as opaque; only wharf verifies them, so a symmetric key suffices.
//! Verification is strict: the header must say exactly HS256, and issuer, audience and
//! lifetime are checked before any claim is trusted.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const ISSUER: &str = "wharf";
/// Clock skew tolerated on `nbf` and `exp`.
const LEEWAY_SECS: i64 = 30;

/// One entry of the `access` claim, as Docker's token spec has it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The user, or "" for an anonymous token.
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub access: Vec<AccessEntry>,
    /// The user's generation when issued: a password change or removal invalidates.
    #[serde(default)]
    #[serde(rename = "gen")]
    pub generation: i64,
    /// The access token the JWT was obtained with, checked for revocation on use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not accepted")]
    Algorithm,
    #[error("bad token signature")]
    Signature,
    #[error("token not for this registry")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length")
}

pub fn sign(key: &[u8], claims: &Claims) -> String {
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signing_input = format!("{header}.{payload}");
    let mut m = mac(key);
    m.update(signing_input.as_bytes());
    let sig = B64.encode(m.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Verifies signature, algorithm, issuer, audience and lifetime at time `now` (unix s).
pub fn verify(key: &[u8], token: &str, audience: &str, now: i64) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: Header = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    if header.alg != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let mut m = mac(key);
    m.update(h.as_bytes());
    m.update(b".");
    m.update(p.as_bytes());
    m.verify_slice(&sig).map_err(|_| JwtError::Signature)?;
    let claims: Claims = B64
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    if claims.iss != ISSUER || claims.aud != audience {
        return Err(JwtError::Audience);
    }
    if claims.exp + LEEWAY_SECS <= now {
        return Err(JwtError::Expired);
    }
    if claims.nbf - LEEWAY_SECS > now {
        return Err(JwtError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(now: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: "wharf".into(),
            exp: now + 300,
            nbf: now,
            iat: now,
            jti: "j1".into(),
            access: vec![AccessEntry {
                kind: "repository".into(),
                name: "team/api".into(),
                actions: vec!["pull".into()],
            }],
            generation: 1,
            tid: None,
        }
    }

    fn forge(header: &str, claims: &Claims, key: Option<&[u8]>) -> String {
        let h = B64.encode(header);
        let p = B64.encode(serde_json::to_vec(claims).unwrap());
        let sig = match key {
            Some(k) => {
                let mut m = mac(k);
                m.update(format!("{h}.{p}").as_bytes());
                B64.encode(m.finalize().into_bytes())
            }
            None => String::new(),
        };
        format!("{h}.{p}.{sig}")
    }

    #[test]
    fn round_trip() {
        let c = claims(1000);
        assert_eq!(verify(KEY, &sign(KEY, &c), "wharf", 1000), Ok(c));
    }

    #[test]
    fn refuses_none_wrong_alg_wrong_key_wrong_aud_iss_and_expired() {
        let now = 1000;
        let c = claims(now);
        assert_eq!(
            verify(
                KEY,
                &forge(r#"{"alg":"none","typ":"JWT"}"#, &c, None),
                "wharf",
                now
            ),
            Err(JwtError::Algorithm)
        );
        assert_eq!(
            verify(KEY, &forge(r#"{"alg":"None"}"#, &c, None), "wharf", now),
            Err(JwtError::Algorithm)
        );
        assert_eq!(
            verify(
                KEY,
                &forge(r#"{"alg":"HS512"}"#, &c, Some(KEY)),
                "wharf",
                now
            ),
            Err(JwtError::Algorithm)
        );
        assert_eq!(
            verify(
                KEY,
                &forge(r#"{"alg":"RS256"}"#, &c, Some(KEY)),
                "wharf",
                now
            ),
            Err(JwtError::Algorithm)
        );
        assert_eq!(
            verify(KEY, &forge(r#"{"alg":"HS256"}"#, &c, None), "wharf", now),
            Err(JwtError::Signature)
        );
        assert_eq!(
            verify(
                KEY,
                &forge(
                    r#"{"alg":"HS256"}"#,
                    &c,
                    Some(b"another key of thirty-two bytes!")
                ),
                "wharf",
                now
            ),
            Err(JwtError::Signature)
        );
        assert_eq!(
            verify(KEY, &sign(KEY, &c), "other-service", now),
            Err(JwtError::Audience)
        );
        let mut wrong_iss = c.clone();
        wrong_iss.iss = "someone-else".into();
        assert_eq!(
            verify(KEY, &sign(KEY, &wrong_iss), "wharf", now),
            Err(JwtError::Audience)
        );
        assert_eq!(
            verify(KEY, &sign(KEY, &c), "wharf", now + 400),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify(KEY, &sign(KEY, &c), "wharf", now - 400),
            Err(JwtError::NotYetValid)
        );
        // Tampered payload.
        let t = sign(KEY, &c);
        let mut parts: Vec<&str> = t.split('.').collect();
        let mut elevated = c.clone();
        elevated.access[0].actions.push("push".into());
        let p = B64.encode(serde_json::to_vec(&elevated).unwrap());
        parts[1] = &p;
        assert_eq!(
            verify(KEY, &parts.join("."), "wharf", now),
            Err(JwtError::Signature)
        );
        for junk in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert!(verify(KEY, junk, "wharf", now).is_err());
        }
    }
}
