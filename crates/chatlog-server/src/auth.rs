//! Authentication: HS256 JWTs (PROTOCOL.md "Authentication") through `jsonwebtoken`, whose
//! HMAC check compares signatures in constant time. The secret is never logged or printed
//! except when the operator asks for a token.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Secrets shorter than this many bytes are refused. The generated secret is 32 random bytes
/// (64 hex characters); an operator-supplied one should be as long and as random.
pub const SECRET_BYTES_MIN: usize = 16;
/// Name of the generated secret file under the data directory.
pub const SECRET_FILE: &str = "auth-secret";
/// Default lifetime of tokens made by `chatlog-server token`.
pub const TOKEN_TTL_SECS_DEFAULT: u64 = 24 * 60 * 60;

/// Token claims.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// Why a token was refused (the message the client sees with `unauthorized`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// Signature, format or algorithm wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `sub` is not a valid user id.
    #[error("invalid token: `sub` must be 1-64 characters of A-Za-z0-9_.@-")]
    BadSubject,
}

/// Verifies and signs tokens with one secret.
#[derive(Clone)]
pub struct Auth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("Auth { .. }")
    }
}

impl Auth {
    /// Keys from a secret.
    pub fn new(secret: &[u8]) -> Result<Auth, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_exp = true;
        let refuse = |e: jsonwebtoken::errors::Error| format!("unusable auth secret: {e}");
        Ok(Auth {
            decoding: DecodingKey::from_secret(secret).map_err(refuse)?,
            encoding: EncodingKey::from_secret(secret).map_err(refuse)?,
            validation,
        })
    }

    /// Checks a token at `now_secs` and returns its claims.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                AuthError::Invalid(match e.kind() {
                    K::ExpiredSignature => return AuthError::Expired,
                    K::InvalidSignature => "signature does not match".into(),
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                        "the algorithm must be HS256".into()
                    }
                    K::MissingRequiredClaim(claim) => format!("missing claim `{claim}`"),
                    K::Json(_) => "claims are not valid JSON of the expected shape".into(),
                    K::Base64(_) | K::Utf8(_) | K::InvalidToken => {
                        "not a JWT (header.payload.signature in base64url)".into()
                    }
                    _ => e.to_string(),
                })
            })?;
        // jsonwebtoken reads the system clock; the injected clock decides too, so tests
        // that move time see expiry.
        if data.claims.exp <= now_secs {
            return Err(AuthError::Expired);
        }
        if chatlog::engine::types::check_user(&data.claims.sub).is_err() {
            return Err(AuthError::BadSubject);
        }
        Ok(data.claims)
    }

    /// Signs a token for `user` valid until `exp` (seconds since the epoch).
    pub fn sign(&self, user: &str, exp: u64) -> String {
        let claims = Claims {
            sub: user.to_owned(),
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing does not fail")
    }
}

/// Reads the secret from `<data_dir>/auth-secret`, creating it (32 random bytes, hex, mode
/// 0600, written atomically) if absent. Returns the secret and whether it was created.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<(String, bool)> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim().to_owned();
            check_secret(&s).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            return Ok((s, false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let bytes: [u8; 32] = rand::random();
    let secret = hex::encode(bytes);
    let tmp = data_dir.join(format!("{SECRET_FILE}.tmp"));
    // A leftover temporary file would keep its old permissions: start from a new file.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(secret.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok((secret, true))
}

/// Refuses secrets too short to be safe.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() < SECRET_BYTES_MIN {
        return Err(format!(
            "the auth secret must be at least {SECRET_BYTES_MIN} bytes (got {})",
            secret.len()
        ));
    }
    Ok(())
}

/// Seconds since the epoch from a ms clock value.
pub fn secs(now_ms: u64) -> u64 {
    now_ms / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 2_000_000_000;

    #[test]
    fn round_trip_and_rejections() {
        let auth = Auth::new(b"0123456789abcdef0123").unwrap();
        let token = auth.sign("alice", NOW + 60);
        assert_eq!(
            auth.verify(&token, NOW).unwrap(),
            Claims {
                sub: "alice".into(),
                exp: NOW + 60
            }
        );
        assert_eq!(auth.verify(&token, NOW + 60), Err(AuthError::Expired));
        let other = Auth::new(b"another secret of length").unwrap();
        assert!(matches!(
            other.verify(&token, NOW),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.verify("not.a.jwt", NOW),
            Err(AuthError::Invalid(_))
        ));
        let bad_sub = auth.sign("has space", NOW + 60);
        assert_eq!(auth.verify(&bad_sub, NOW), Err(AuthError::BadSubject));
        // A token already expired by the system clock is refused whatever the test clock says.
        let old = auth.sign("alice", 1000);
        assert_eq!(auth.verify(&old, 10), Err(AuthError::Expired));
    }

    #[test]
    fn none_algorithm_and_tampering_are_refused() {
        let auth = Auth::new(b"0123456789abcdef0123").unwrap();
        let token = auth.sign("alice", NOW + 60);
        let mut parts: Vec<&str> = token.split('.').collect();
        // Header {"alg":"none","typ":"JWT"} with the original payload and no signature.
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        parts[0] = none_header;
        let forged = format!("{}.{}.", parts[0], parts[1]);
        assert!(matches!(
            auth.verify(&forged, NOW),
            Err(AuthError::Invalid(_))
        ));
        // A different payload under the original signature.
        let bob = auth.sign("bob", NOW + 60);
        let bob_payload = bob.split('.').nth(1).unwrap();
        let original: Vec<&str> = token.split('.').collect();
        let swapped = format!("{}.{}.{}", original[0], bob_payload, original[2]);
        assert!(matches!(
            auth.verify(&swapped, NOW),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn secret_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create_secret(dir.path()).unwrap();
        assert!(created);
        let (b, created) = load_or_create_secret(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        std::fs::write(dir.path().join(SECRET_FILE), "short").unwrap();
        let e = load_or_create_secret(dir.path()).unwrap_err();
        assert!(e.to_string().contains("at least"), "{e}");
    }
}
