//! Errors of chat operations: one variant per protocol error code the engine can cause.

/// Why a chat operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// Malformed or inconsistent input (`bad_request`).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The caller may not do this (`forbidden`).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such chat, message or file (`not_found`).
    #[error("not found: {0}")]
    NotFound(String),
    /// A body or other value is over its limit (`too_large`).
    #[error("too large: {what} is {actual} bytes, above the limit of {limit}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// The offending size.
        actual: usize,
    },
    /// A chat would exceed its member limit (`too_many_members`).
    #[error("too many members: {actual} above the limit of {limit}")]
    TooManyMembers {
        /// The limit.
        limit: usize,
        /// Members the chat would have.
        actual: usize,
    },
    /// Too many operations are queued; retry shortly (`unavailable`).
    #[error("unavailable: the engine is overloaded; retry shortly")]
    Busy,
    /// Storage is failing or the engine is shutting down; safe to retry with the same cmid
    /// after the engine is reopened (`unavailable`).
    #[error("unavailable: {0}")]
    Unavailable(#[from] crate::Error),
}

impl ChatError {
    /// The protocol error code (PROTOCOL.md).
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::BadRequest(_) => "bad_request",
            ChatError::Forbidden(_) => "forbidden",
            ChatError::NotFound(_) => "not_found",
            ChatError::TooLarge { .. } => "too_large",
            ChatError::TooManyMembers { .. } => "too_many_members",
            ChatError::Busy | ChatError::Unavailable(_) => "unavailable",
        }
    }
}

/// A [`ChatError`] refusing an operation, in a form that can be stored and sent between
/// nodes. Replicated operations answer with these: every replica decides the same refusal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Refusal {
    /// `bad_request`.
    BadRequest(String),
    /// `forbidden`.
    Forbidden(String),
    /// `not_found`.
    NotFound(String),
    /// `too_large`.
    TooLarge {
        /// What.
        what: String,
        /// The limit.
        limit: usize,
        /// The offending size.
        actual: usize,
    },
    /// `too_many_members`.
    TooManyMembers {
        /// The limit.
        limit: usize,
        /// Members the chat would have.
        actual: usize,
    },
    /// `unavailable`.
    Unavailable(String),
}

impl From<&ChatError> for Refusal {
    fn from(e: &ChatError) -> Self {
        match e {
            ChatError::BadRequest(m) => Refusal::BadRequest(m.clone()),
            ChatError::Forbidden(m) => Refusal::Forbidden(m.clone()),
            ChatError::NotFound(m) => Refusal::NotFound(m.clone()),
            ChatError::TooLarge {
                what,
                limit,
                actual,
            } => Refusal::TooLarge {
                what: (*what).to_owned(),
                limit: *limit,
                actual: *actual,
            },
            ChatError::TooManyMembers { limit, actual } => Refusal::TooManyMembers {
                limit: *limit,
                actual: *actual,
            },
            ChatError::Busy | ChatError::Unavailable(_) => Refusal::Unavailable(e.to_string()),
        }
    }
}

impl From<Refusal> for ChatError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::BadRequest(m) => ChatError::BadRequest(m),
            Refusal::Forbidden(m) => ChatError::Forbidden(m),
            Refusal::NotFound(m) => ChatError::NotFound(m),
            Refusal::TooLarge {
                what,
                limit,
                actual,
            } => ChatError::TooLarge {
                what: static_what(&what),
                limit,
                actual,
            },
            Refusal::TooManyMembers { limit, actual } => {
                ChatError::TooManyMembers { limit, actual }
            }
            Refusal::Unavailable(m) => ChatError::Unavailable(crate::Error::Io {
                op: "replicated write",
                path: std::path::PathBuf::from("cluster"),
                source: std::io::Error::other(m),
            }),
        }
    }
}

/// The engine's `TooLarge::what` values are static names; map a received one back.
fn static_what(what: &str) -> &'static str {
    match what {
        "body" => "body",
        "title" => "title",
        "file" => "file",
        "file id" => "file id",
        _ => "value",
    }
}
