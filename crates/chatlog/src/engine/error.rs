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
