//! Errors inside the sandbox init; they reach the builder as text in a report.

use std::error::Error as _;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("{action}")]
    Sys {
        action: String,
        #[source]
        source: nix::Error,
    },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Message(String),
}

impl SetupError {
    /// The message with its cause chain, since only text crosses the process boundary.
    pub(crate) fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = self.source();
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}

pub(crate) trait Context<T> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T, SetupError>;
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|source| SetupError::Sys {
            action: action(),
            source,
        })
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|source| SetupError::Io {
            action: action(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_cause() {
        let e: Result<(), _> = Err(nix::Error::EPERM);
        let e = e.ctx(|| "mount proc on /proc".into()).unwrap_err();
        assert_eq!(
            e.chain(),
            "mount proc on /proc: EPERM: Operation not permitted"
        );
    }
}
