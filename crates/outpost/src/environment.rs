//! Deployment environments and the polling defaults each one implies.

use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// Where the service runs; picks the relay's polling defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Environment {
    /// Tests: idle polling capped at 0.1 s, error back-off 1 s.
    Testing,
    /// Local development: 1 s, error back-off 10 s.
    Development,
    /// Production: 5 s, error back-off 30 s.
    #[default]
    Production,
}

impl Environment {
    /// The longest idle wait between polls.
    pub fn max_poll_interval(self) -> Duration {
        match self {
            Self::Testing => Duration::from_millis(100),
            Self::Development => Duration::from_secs(1),
            Self::Production => Duration::from_secs(5),
        }
    }

    /// How long the relay waits after a failed iteration (database down).
    pub fn error_backoff(self) -> Duration {
        match self {
            Self::Testing => Duration::from_secs(1),
            Self::Development => Duration::from_secs(10),
            Self::Production => Duration::from_secs(30),
        }
    }
}

impl FromStr for Environment {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "testing" | "test" => Ok(Self::Testing),
            "development" | "dev" => Ok(Self::Development),
            "production" | "prod" => Ok(Self::Production),
            _ => Err(Error::config(
                "OUTPOST_ENVIRONMENT",
                "one of testing, development, production",
                s,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        assert_eq!(
            "Testing".parse::<Environment>().unwrap(),
            Environment::Testing
        );
        assert_eq!(
            Environment::Testing.max_poll_interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            Environment::Development.max_poll_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Environment::default().max_poll_interval(),
            Duration::from_secs(5)
        );
        assert_eq!(
            Environment::Production.error_backoff(),
            Duration::from_secs(30)
        );
        assert!("staging".parse::<Environment>().is_err());
    }
}
