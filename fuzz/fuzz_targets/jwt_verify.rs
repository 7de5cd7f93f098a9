//! Token verification, `chatlog_server::auth::Auth::verify` (built from its source file,
//! `chatlog_fuzz::server_auth`), on untrusted tokens.
//!
//! `verify` must never panic, and must accept only what was signed with its secret. The oracle
//! ([`Session::check`]) keeps the `header.payload` text of every token this input had signed
//! (by `Auth::sign`, or by HMAC-SHA256 over arbitrary header and payload bytes, as another
//! auth service with the same secret would) and requires of every token:
//!
//! - accepted ⇒ its `header.payload` is one of those signed, its signature decodes to that
//!   text's MAC, the header says `HS256`, the claims returned are the payload's `sub` and `exp`,
//!   `exp > now`, `sub` is a valid user id and there is no `aud`;
//! - refused as expired or for its subject ⇒ it was signed (claims are never judged before the
//!   signature holds);
//! - a verifier with another secret refuses it as invalid.
//!
//! A token made by `Auth::sign` and checked unchanged must verify exactly when its `exp` is
//! ahead of both clocks (the injected `now` and, with a margin, the system clock that
//! `jsonwebtoken` also reads) and its `sub` is valid, and fail with `Expired` / `BadSubject`
//! otherwise.
//!
//! The oracle is sound because the fuzzer never sees a MAC: only this target computes them, it
//! puts them only into the tokens it builds, and the verifier compares them in constant time,
//! so an accepted token whose text this input did not sign would be a forgery.
//!
//! Inputs whose first byte is `0xFF` (never part of UTF-8 text) describe a secret, a clock and
//! a sequence of tokens ([`Step`]): signed, hand-built (header and payload JSON in several
//! base64 spellings, signed or not) and mutations of earlier ones. Any other input is one token
//! as text under a fixed secret, where nothing was signed, so it must be refused as invalid.

#![no_main]

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use arbitrary::{Arbitrary, Result, Unstructured};
use chatlog::engine::types::check_user;
use chatlog_fuzz::server_auth::{Auth, AuthError, Claims};
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sha2::Sha256;

/// The secret of raw inputs and of most described ones.
const SECRET: &[u8] = b"chatlog-fuzz-secret-0123456789ab";
/// Most steps (tokens built) in one described input.
const STEPS_MAX: usize = 12;
/// Longest arbitrary secret (past 64 bytes HMAC hashes the key first).
const SECRET_BYTES_MAX: usize = 100;
/// How far `exp` must be from the system clock before the target predicts `jsonwebtoken`'s
/// own expiry check (the clock moves while an input runs).
const CLOCK_MARGIN_SECS: u64 = 120;
/// Nesting of arbitrary JSON values.
const VALUE_DEPTH_MAX: u32 = 2;
/// Most mutations applied to one token.
const MUTATIONS_MAX: usize = 4;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0xFF, rest)) => {
            // Running out of input part-way through is fine: every token built was checked.
            let _ = described(&mut Unstructured::new(rest));
        }
        _ => {
            let token = String::from_utf8_lossy(data);
            let session = Session::new(SECRET.to_vec()).expect("the fixed secret is usable");
            let result = session.check(&token, system_now());
            assert!(
                matches!(result, Err(AuthError::Invalid(_))),
                "nothing was signed, yet {token:?} gave {result:?}"
            );
        }
    }
});

/// One verifier, a verifier with another secret, and what was signed.
struct Session {
    secret: Vec<u8>,
    auth: Auth,
    other: Auth,
    /// The `header.payload` text of every token signed in this input.
    signed: HashSet<String>,
    /// Every token built so far, to mutate.
    tokens: Vec<String>,
}

impl Session {
    /// `None` when the secret is empty (which `Auth::new` must refuse).
    fn new(secret: Vec<u8>) -> Option<Session> {
        let auth = Auth::new(&secret);
        assert_eq!(
            auth.is_err(),
            secret.is_empty(),
            "Auth::new refuses exactly the empty secret"
        );
        let auth = auth.ok()?;
        // Flipping the first byte gives a key HMAC treats as different: keys up to the block
        // size (64 bytes) are zero-padded and differ in byte 0; longer ones are hashed.
        let mut other_secret = secret.clone();
        other_secret[0] ^= 1;
        Some(Session {
            auth,
            other: Auth::new(&other_secret).expect("non-empty"),
            secret,
            signed: HashSet::new(),
            tokens: Vec::new(),
        })
    }

    fn mac(&self, message: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }

    /// Signs `header.payload` as given (any text) and returns the token.
    fn sign_message(&mut self, message: String, encoding: Encoding) -> String {
        let signature = encode(&self.mac(message.as_bytes()), encoding);
        let token = format!("{message}.{signature}");
        self.signed.insert(message);
        token
    }

    /// Verifies `token` at `now` and checks the result against what was signed.
    fn check(&self, token: &str, now: u64) -> std::result::Result<Claims, AuthError> {
        let result = self.auth.verify(token, now);
        if trace() {
            eprintln!("verify {token:?} at {now}: {result:?}");
        }
        let other = self.other.verify(token, now);
        assert!(
            matches!(other, Err(AuthError::Invalid(_))),
            "another secret's verifier gave {other:?} for {token:?}"
        );
        // `jsonwebtoken` splits at the last two dots: the signature is after the last one.
        let signed = token
            .rsplit_once('.')
            .filter(|(message, _)| self.signed.contains(*message));
        match &result {
            Ok(claims) => {
                let Some((message, signature)) = signed else {
                    panic!("accepted a token whose text was never signed: {token:?} -> {claims:?}");
                };
                assert_eq!(
                    decode(signature),
                    Some(self.mac(message.as_bytes())),
                    "accepted {token:?} whose signature is not its MAC"
                );
                let (header, payload) = message
                    .rsplit_once('.')
                    .expect("an accepted token has a header and a payload");
                let header = decode_json(header)
                    .unwrap_or_else(|| panic!("accepted {token:?} with an unreadable header"));
                assert_eq!(
                    header.get("alg").and_then(Value::as_str),
                    Some("HS256"),
                    "accepted {token:?} with another algorithm"
                );
                let payload = decode_json(payload)
                    .unwrap_or_else(|| panic!("accepted {token:?} with an unreadable payload"));
                assert_eq!(
                    payload.get("sub").and_then(Value::as_str),
                    Some(claims.sub.as_str()),
                    "claims differ from the payload of {token:?}"
                );
                assert_eq!(
                    payload.get("exp").and_then(Value::as_u64),
                    Some(claims.exp),
                    "claims differ from the payload of {token:?}"
                );
                assert!(
                    payload.get("aud").is_none_or(Value::is_null),
                    "accepted {token:?} with an audience"
                );
                assert!(claims.exp > now, "accepted {token:?} expired at {now}");
                assert!(
                    check_user(&claims.sub).is_ok(),
                    "accepted {token:?} for an invalid user id"
                );
            }
            Err(AuthError::Expired | AuthError::BadSubject) => {
                let Some((message, signature)) = signed else {
                    panic!("judged the claims of a token never signed: {token:?} -> {result:?}");
                };
                assert_eq!(
                    decode(signature),
                    Some(self.mac(message.as_bytes())),
                    "judged the claims of {token:?} whose signature is not its MAC: {result:?}"
                );
            }
            Err(AuthError::Invalid(message)) => {
                assert!(!message.is_empty(), "empty reason for {token:?}");
            }
            // `AuthError` is non-exhaustive: a new kind of refusal is still a refusal.
            Err(_) => {}
        }
        result
    }
}

/// One step of a described input.
#[derive(Debug, Arbitrary)]
enum Step {
    /// `Auth::sign` for a described subject and expiry, checked unchanged.
    Sign { subject: Subject, expiry: Expiry },
    /// Header and payload JSON built from the input, spelt in base64, signed or not.
    Build {
        header: HeaderShape,
        payload: PayloadShape,
        encoding: Encoding,
        signature: Signature,
    },
    /// Changes to an earlier token.
    Mutate {
        which: u8,
        mutations: [Option<Mutation>; MUTATIONS_MAX],
    },
    /// Any text.
    Text(String),
}

#[derive(Debug, Arbitrary)]
enum Subject {
    Valid,
    Longest,
    TooLong,
    Empty,
    WithSpace,
    Any(String),
}

#[derive(Debug, Arbitrary)]
enum Expiry {
    /// Relative to the injected clock.
    FromNow(i32),
    /// Relative to the system clock.
    FromSystem(i32),
    Zero,
    Max,
    Any(u64),
}

#[derive(Debug, Arbitrary)]
enum HeaderShape {
    /// An object with an `alg` (and maybe `typ` and other members, maybe `alg` twice).
    Object {
        alg: Algorithm,
        typ: bool,
        extra: Option<(FieldName, u8)>,
        second_alg: Option<Algorithm>,
    },
    /// Any JSON value.
    Json(u8),
    /// Any text.
    Text(String),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Algorithm {
    Hs256,
    None,
    NoneCapitalised,
    Hs384,
    Hs512,
    Rs256,
    Es256,
    EdDsa,
    Lowercase,
    Empty,
    Absent,
    NotAString,
}

#[derive(Debug, Arbitrary)]
enum PayloadShape {
    /// An object with the claims, each of some kind.
    Object {
        sub: ClaimKind,
        exp: ClaimKind,
        aud: Option<ClaimKind>,
        extra: Option<(FieldName, u8)>,
        /// Repeat `sub` or `exp` with another value.
        repeat: Option<bool>,
    },
    Json(u8),
    Text(String),
}

/// What a claim holds.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum ClaimKind {
    /// The right type and a good value (a valid user; an `exp` ahead of both clocks).
    Good,
    /// The right type and a bad value (an invalid user; an `exp` in the past).
    Bad,
    /// An `exp` at the edge of the injected clock; a 64-character user id.
    Edge,
    /// Another JSON type.
    Other(u8),
    Null,
    Absent,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum FieldName {
    Kid,
    Crit,
    B64,
    Nbf,
    Iat,
    Iss,
    Jwk,
    Random,
}

/// How a segment is spelt in base64.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Encoding {
    /// base64url without padding, as JWT requires.
    Canonical,
    Padded,
    /// The standard alphabet (`+` and `/`).
    Standard,
    /// Non-zero unused bits in the last character.
    TrailingBits,
    /// A stray character somewhere.
    Stray {
        at: u8,
        byte: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum Signature {
    /// The MAC of the message as spelt.
    Signed,
    /// Any bytes.
    Bytes(Vec<u8>),
    /// None at all (`header.payload.`).
    Empty,
    /// The MAC of the same message spelt canonically.
    SignedCanonical,
}

#[derive(Debug, Arbitrary)]
enum Mutation {
    Flip {
        at: u16,
        mask: u8,
    },
    Set {
        at: u16,
        byte: u8,
    },
    Insert {
        at: u16,
        byte: u8,
    },
    Remove {
        at: u16,
    },
    Truncate {
        at: u16,
    },
    Append {
        byte: u8,
    },
    /// Replace segment `segment` by the same segment of another token.
    Splice {
        from: u8,
        segment: u8,
    },
    SwapCase {
        at: u16,
    },
}

/// A secret, a clock, and tokens built step by step, each checked as it is built.
fn described(u: &mut Unstructured<'_>) -> Result<()> {
    let secret = if u.ratio(1u8, 4)? {
        let len = u.int_in_range(0..=SECRET_BYTES_MAX)?;
        u.bytes(len)?.to_vec()
    } else {
        SECRET.to_vec()
    };
    let Some(mut session) = Session::new(secret) else {
        return Ok(());
    };
    let system = system_now();
    let now = match u.int_in_range(0u8..=7)? {
        0 => 0,
        1 => u64::MAX,
        2 => u.arbitrary()?,
        3 => system.saturating_sub(u.int_in_range(0..=100_000)?),
        4 => system + u.int_in_range(0..=100_000)?,
        _ => system,
    };
    let steps = u.int_in_range(1..=STEPS_MAX)?;
    for _ in 0..steps {
        let step: Step = u.arbitrary()?;
        let token = match step {
            Step::Sign { subject, expiry } => {
                let sub = subject_text(subject);
                let exp = expiry_value(expiry, now);
                let token = session.auth.sign(&sub, exp);
                let (message, _) = token.rsplit_once('.').expect("a signed token has dots");
                session.signed.insert(message.to_owned());
                let result = session.check(&token, now);
                check_signed_outcome(&token, &sub, exp, now, &result);
                token
            }
            Step::Build {
                header,
                payload,
                encoding,
                signature,
            } => {
                let header = header_text(u, header)?;
                let payload = payload_text(u, payload, now)?;
                let message = format!(
                    "{}.{}",
                    encode(header.as_bytes(), encoding),
                    encode(payload.as_bytes(), encoding)
                );
                let token = match signature {
                    Signature::Signed => session.sign_message(message, Encoding::Canonical),
                    Signature::Bytes(bytes) => {
                        format!("{message}.{}", encode(&bytes, Encoding::Canonical))
                    }
                    Signature::Empty => format!("{message}."),
                    Signature::SignedCanonical => {
                        let canonical = format!(
                            "{}.{}",
                            encode(header.as_bytes(), Encoding::Canonical),
                            encode(payload.as_bytes(), Encoding::Canonical)
                        );
                        let signature =
                            encode(&session.mac(canonical.as_bytes()), Encoding::Canonical);
                        session.signed.insert(canonical);
                        format!("{message}.{signature}")
                    }
                };
                let _ = session.check(&token, now);
                token
            }
            Step::Mutate { which, mutations } => {
                let Some(original) = pick(&session.tokens, which) else {
                    continue;
                };
                let mut bytes = original.as_bytes().to_vec();
                for mutation in mutations.into_iter().flatten() {
                    mutate(&mut bytes, mutation, &session.tokens);
                }
                let token = String::from_utf8_lossy(&bytes).into_owned();
                let _ = session.check(&token, now);
                token
            }
            Step::Text(token) => {
                let _ = session.check(&token, now);
                token
            }
        };
        session.tokens.push(token);
    }
    Ok(())
}

/// What `verify` must say about an unchanged token from `Auth::sign`.
fn check_signed_outcome(
    token: &str,
    sub: &str,
    exp: u64,
    now: u64,
    result: &std::result::Result<Claims, AuthError>,
) {
    let system = system_now();
    if exp <= now || exp.saturating_add(CLOCK_MARGIN_SECS) < system {
        assert_eq!(result, &Err(AuthError::Expired), "{token:?}");
    } else if exp <= system.saturating_add(CLOCK_MARGIN_SECS) {
        // Near the system clock `jsonwebtoken` decides; either answer is right.
    } else if check_user(sub).is_err() {
        assert_eq!(result, &Err(AuthError::BadSubject), "{token:?}");
    } else {
        let claims = Claims {
            sub: sub.to_owned(),
            exp,
        };
        assert_eq!(result, &Ok(claims), "a good token was refused: {token:?}");
    }
}

fn subject_text(subject: Subject) -> String {
    match subject {
        Subject::Valid => "alice.b@x-1_Z".to_owned(),
        Subject::Longest => "u".repeat(64),
        Subject::TooLong => "u".repeat(65),
        Subject::Empty => String::new(),
        Subject::WithSpace => "has space".to_owned(),
        Subject::Any(s) => s,
    }
}

fn expiry_value(expiry: Expiry, now: u64) -> u64 {
    match expiry {
        Expiry::FromNow(delta) => now.saturating_add_signed(i64::from(delta)),
        Expiry::FromSystem(delta) => system_now().saturating_add_signed(i64::from(delta)),
        Expiry::Zero => 0,
        Expiry::Max => u64::MAX,
        Expiry::Any(exp) => exp,
    }
}

fn header_text(u: &mut Unstructured<'_>, shape: HeaderShape) -> Result<String> {
    Ok(match shape {
        HeaderShape::Object {
            alg,
            typ,
            extra,
            second_alg,
        } => {
            let mut members = Vec::new();
            push_alg(u, &mut members, alg)?;
            if typ {
                members.push(("typ".to_owned(), Value::from("JWT")));
            }
            if let Some((name, seed)) = extra {
                members.push((field_name(u, name)?, small_value(seed)));
            }
            if let Some(alg) = second_alg {
                push_alg(u, &mut members, alg)?;
            }
            object_text(&members)
        }
        HeaderShape::Json(seed) => any_value(u, seed, VALUE_DEPTH_MAX)?.to_string(),
        HeaderShape::Text(text) => text,
    })
}

fn push_alg(
    u: &mut Unstructured<'_>,
    members: &mut Vec<(String, Value)>,
    alg: Algorithm,
) -> Result<()> {
    let value = match alg {
        Algorithm::Hs256 => "HS256".into(),
        Algorithm::None => "none".into(),
        Algorithm::NoneCapitalised => "None".into(),
        Algorithm::Hs384 => "HS384".into(),
        Algorithm::Hs512 => "HS512".into(),
        Algorithm::Rs256 => "RS256".into(),
        Algorithm::Es256 => "ES256".into(),
        Algorithm::EdDsa => "EdDSA".into(),
        Algorithm::Lowercase => "hs256".into(),
        Algorithm::Empty => "".into(),
        Algorithm::Absent => return Ok(()),
        Algorithm::NotAString => any_value(u, 1, 1)?,
    };
    members.push(("alg".to_owned(), value));
    Ok(())
}

fn payload_text(u: &mut Unstructured<'_>, shape: PayloadShape, now: u64) -> Result<String> {
    Ok(match shape {
        PayloadShape::Object {
            sub,
            exp,
            aud,
            extra,
            repeat,
        } => {
            let mut members = Vec::new();
            push_claim(u, &mut members, "sub", sub, now)?;
            push_claim(u, &mut members, "exp", exp, now)?;
            if let Some(aud) = aud {
                push_claim(u, &mut members, "aud", aud, now)?;
            }
            if let Some((name, seed)) = extra {
                members.push((field_name(u, name)?, small_value(seed)));
            }
            match repeat {
                Some(true) => push_claim(u, &mut members, "sub", ClaimKind::Bad, now)?,
                Some(false) => push_claim(u, &mut members, "exp", ClaimKind::Good, now)?,
                None => {}
            }
            object_text(&members)
        }
        PayloadShape::Json(seed) => any_value(u, seed, VALUE_DEPTH_MAX)?.to_string(),
        PayloadShape::Text(text) => text,
    })
}

fn push_claim(
    u: &mut Unstructured<'_>,
    members: &mut Vec<(String, Value)>,
    name: &str,
    kind: ClaimKind,
    now: u64,
) -> Result<()> {
    let good_exp = now.max(system_now()).saturating_add(3600);
    let value = match (name, kind) {
        (_, ClaimKind::Absent) => return Ok(()),
        (_, ClaimKind::Null) => Value::Null,
        (_, ClaimKind::Other(seed)) => any_value(u, seed, 1)?,
        ("exp", ClaimKind::Good) => good_exp.into(),
        ("exp", ClaimKind::Bad) => now.min(system_now()).saturating_sub(1).into(),
        ("exp", ClaimKind::Edge) => now.into(),
        (_, ClaimKind::Good) => "bob".into(),
        (_, ClaimKind::Bad) => "bad user!".into(),
        (_, ClaimKind::Edge) => "e".repeat(64).into(),
    };
    members.push((name.to_owned(), value));
    Ok(())
}

fn field_name(u: &mut Unstructured<'_>, name: FieldName) -> Result<String> {
    Ok(match name {
        FieldName::Kid => "kid".into(),
        FieldName::Crit => "crit".into(),
        FieldName::B64 => "b64".into(),
        FieldName::Nbf => "nbf".into(),
        FieldName::Iat => "iat".into(),
        FieldName::Iss => "iss".into(),
        FieldName::Jwk => "jwk".into(),
        FieldName::Random => u.arbitrary()?,
    })
}

/// A JSON object written member by member, so a name may repeat.
fn object_text(members: &[(String, Value)]) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|(name, value)| format!("{}:{value}", Value::String(name.clone())))
        .collect();
    format!("{{{}}}", members.join(","))
}

/// A JSON value of a kind chosen by `seed`, nested at most `depth` deep.
fn any_value(u: &mut Unstructured<'_>, seed: u8, depth: u32) -> Result<Value> {
    // At depth 0 only scalars and strings.
    let kinds = if depth == 0 { 6 } else { 8 };
    Ok(match seed % kinds {
        0..=4 => small_value(seed),
        5 => Value::String(u.arbitrary()?),
        6 => {
            let len = u.int_in_range(0..=3)?;
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                let seed = u.arbitrary()?;
                items.push(any_value(u, seed, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let len = u.int_in_range(0..=3)?;
            let mut map = serde_json::Map::new();
            for _ in 0..len {
                let name = u.arbitrary()?;
                let name = field_name(u, name)?;
                let seed = u.arbitrary()?;
                map.insert(name, any_value(u, seed, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

/// A scalar picked by `seed`.
fn small_value(seed: u8) -> Value {
    match seed % 5 {
        0 => Value::Null,
        1 => Value::Bool(seed & 0x80 != 0),
        2 => (i64::from(seed) - 128).into(),
        3 => (f64::from(seed) / 3.0).into(),
        _ => format!("v{seed}").into(),
    }
}

fn pick(tokens: &[String], which: u8) -> Option<&String> {
    if tokens.is_empty() {
        None
    } else {
        tokens.get(usize::from(which) % tokens.len())
    }
}

/// Characters that keep a token looking like one.
const TOKEN_BYTES: &[u8] = b"ABCXYZabcxyz0189-_.=+/ ";

/// A byte for a mutation: mostly one of [`TOKEN_BYTES`], sometimes any.
fn token_byte(byte: u8) -> u8 {
    if byte & 0x80 == 0 {
        TOKEN_BYTES[usize::from(byte) % TOKEN_BYTES.len()]
    } else {
        byte
    }
}

fn mutate(bytes: &mut Vec<u8>, mutation: Mutation, tokens: &[String]) {
    let len = bytes.len();
    let at = |at: u16| usize::from(at) % len.max(1);
    match mutation {
        Mutation::Flip { at: i, mask } if len > 0 => bytes[at(i)] ^= mask.max(1),
        Mutation::Set { at: i, byte } if len > 0 => bytes[at(i)] = token_byte(byte),
        Mutation::Insert { at: i, byte } => {
            bytes.insert(usize::from(i) % (len + 1), token_byte(byte))
        }
        Mutation::Remove { at: i } if len > 0 => {
            bytes.remove(at(i));
        }
        Mutation::Truncate { at: i } => bytes.truncate(usize::from(i) % (len + 1)),
        Mutation::Append { byte } => bytes.push(token_byte(byte)),
        Mutation::Splice { from, segment } => {
            let Some(donor) = pick(tokens, from) else {
                return;
            };
            let segment = usize::from(segment % 3);
            let mut parts: Vec<Vec<u8>> = bytes.split(|b| *b == b'.').map(<[u8]>::to_vec).collect();
            if let (Some(part), Some(new)) = (parts.get_mut(segment), donor.split('.').nth(segment))
            {
                *part = new.as_bytes().to_vec();
            }
            *bytes = parts.join(&b'.');
        }
        Mutation::SwapCase { at: i } if len > 0 => {
            let b = &mut bytes[at(i)];
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        _ => {}
    }
}

const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 of `bytes`, spelt as `encoding` says.
fn encode(bytes: &[u8], encoding: Encoding) -> String {
    let alphabet = match encoding {
        Encoding::Standard => STANDARD,
        _ => URL_SAFE,
    };
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize]);
        }
        if matches!(encoding, Encoding::Padded) {
            out.extend(std::iter::repeat_n(b'=', 4 - chars));
        }
    }
    match encoding {
        Encoding::TrailingBits if !bytes.len().is_multiple_of(3) => {
            // The last character carries 2 or 4 unused low bits; set the lowest.
            let last = out.last_mut().expect("non-empty");
            let value = URL_SAFE
                .iter()
                .position(|c| c == last)
                .expect("in the alphabet");
            *last = URL_SAFE[value | 1];
        }
        Encoding::Stray { at, byte } => {
            let at = usize::from(at) % (out.len() + 1);
            out.insert(at, token_byte(byte));
        }
        _ => {}
    }
    // A stray byte may be any byte: keep what is text.
    String::from_utf8_lossy(&out).into_owned()
}

/// Lenient base64: either alphabet, optional padding, unused bits ignored. `None` if the text is
/// not base64 at all. (Whatever the verifier decodes, this decodes to the same bytes.)
fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut n = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        n = n << 6 | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits) as u8);
            n &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}

fn decode_json(segment: &str) -> Option<Value> {
    serde_json::from_slice(&decode(segment)?).ok()
}

/// `CHATLOG_FUZZ_TRACE=1` prints each token and what `verify` said (to read a crash input).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("CHATLOG_FUZZ_TRACE").is_some())
}

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}
