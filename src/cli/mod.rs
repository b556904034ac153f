//! The operator's commands besides `serve`: `validate`, `import`, `reindex`, `migrate`,
//! `config check`. Each returns an exit code (see [`Exit`]); progress goes to stderr, results to
//! stdout.

/// The exit-code table at the end of each command's `--help` (a macro: `concat!` takes literals).
macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  done, every input accepted
  1  done, some inputs invalid or rejected (listed, with the reason)
  2  usage or configuration error (arguments, unreadable or invalid files)
  3  database error (could not open, migrate or write; re-run to resume)"
    };
}

pub mod config_check;
pub mod import;
pub mod input;
pub mod migrate;
pub mod progress;
pub mod reindex;
pub mod validate;

/// The exit codes every command documents in its `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything was done and every input was accepted.
    Ok = 0,
    /// Done, but some inputs were invalid or rejected (the report says which and why).
    Rejected = 1,
    /// Wrong usage or configuration (bad arguments, unreadable or invalid files, a progress file
    /// of another input or database).
    Usage = 2,
    /// The database could not be opened or written (nothing is lost: re-run to resume).
    Database = 3,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// A database URL without its password, for messages and progress files.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}@{}", &url[..s], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Print an error for the operator and give its exit code.
pub fn fail(code: Exit, message: impl std::fmt::Display) -> Exit {
    eprintln!("error: {message}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://app:secret@db.example:5432/s"),
            "postgres://app@db.example:5432/s"
        );
        assert_eq!(redact("sqlite://data/s.db"), "sqlite://data/s.db");
    }
}
