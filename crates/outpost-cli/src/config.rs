//! The `--config` file: shared settings plus one `[[service]]` table per outbox the relay
//! serves. Plain data; [`crate::settings`] layers flags and environment variables over it
//! and validates the result once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost::Error;
use serde::Deserialize;

use crate::cli::{LogFormat, Wake};

/// The whole file. Every key is optional; see the README for defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the file was read from (for messages).
    #[serde(skip)]
    pub path: PathBuf,
    pub database_url: Option<String>,
    pub brokers: Option<String>,
    pub redis_url: Option<String>,
    pub environment: Option<String>,
    pub http_addr: Option<String>,
    pub log_format: Option<LogFormat>,
    pub delivery_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    pub statement_timeout_ms: Option<u64>,
    pub retention_secs: Option<u64>,
    /// Defaults for every service; a service's own value wins.
    pub wake: Option<Wake>,
    pub poll_min_ms: Option<u64>,
    pub poll_max_ms: Option<u64>,
    pub error_backoff_ms: Option<u64>,
    pub batch_size: Option<usize>,
    pub max_in_flight: Option<usize>,
    /// Topic overrides for every service: staged topic = produced topic.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
    /// librdkafka producer properties.
    #[serde(default)]
    pub kafka_options: BTreeMap<String, String>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceFile>,
}

/// One `[[service]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: String,
    /// Defaults to the service name.
    pub schema: Option<String>,
    pub wake: Option<Wake>,
    pub poll_min_ms: Option<u64>,
    pub poll_max_ms: Option<u64>,
    pub error_backoff_ms: Option<u64>,
    pub batch_size: Option<usize>,
    pub max_in_flight: Option<usize>,
    /// This service's topic overrides, over the top-level ones.
    #[serde(default)]
    pub topics: BTreeMap<String, String>,
}

impl ServiceFile {
    /// This service's own settings, falling back to the file's top level.
    pub fn options(&self, file: &ConfigFile) -> ServiceOptions {
        ServiceOptions {
            wake: self.wake,
            poll_min_ms: self.poll_min_ms,
            poll_max_ms: self.poll_max_ms,
            error_backoff_ms: self.error_backoff_ms,
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
            topics: self.topics.clone(),
        }
        .or(file.defaults())
    }
}

/// Settings a service may set for itself or inherit from the top level.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServiceOptions {
    pub wake: Option<Wake>,
    pub poll_min_ms: Option<u64>,
    pub poll_max_ms: Option<u64>,
    pub error_backoff_ms: Option<u64>,
    pub batch_size: Option<usize>,
    pub max_in_flight: Option<usize>,
    /// Staged topic = produced topic.
    pub topics: BTreeMap<String, String>,
}

impl ServiceOptions {
    /// `self`, falling back to `defaults` field by field.
    /// Topic overrides merge entry by entry, `self`'s winning.
    pub fn or(self, defaults: Self) -> Self {
        let mut topics = defaults.topics;
        topics.extend(self.topics);
        Self {
            wake: self.wake.or(defaults.wake),
            poll_min_ms: self.poll_min_ms.or(defaults.poll_min_ms),
            poll_max_ms: self.poll_max_ms.or(defaults.poll_max_ms),
            error_backoff_ms: self.error_backoff_ms.or(defaults.error_backoff_ms),
            batch_size: self.batch_size.or(defaults.batch_size),
            max_in_flight: self.max_in_flight.or(defaults.max_in_flight),
            topics,
        }
    }
}

impl ConfigFile {
    /// The top-level service settings (defaults for every `[[service]]`).
    pub fn defaults(&self) -> ServiceOptions {
        ServiceOptions {
            wake: self.wake,
            poll_min_ms: self.poll_min_ms,
            poll_max_ms: self.poll_max_ms,
            error_backoff_ms: self.error_backoff_ms,
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
            topics: self.topics.clone(),
        }
    }

    /// Reads and parses `path`.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the file and, for a bad key, its path in the file
    /// (`service[1].wake`) and the expected form; never the offending line's text, which
    /// may hold a password.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(
                "OUTPOST_CONFIG (--config)",
                "a readable TOML file",
                format!("{shown} ({e})"),
            )
        })?;
        let mut file = Self::parse(&text).map_err(|bad| {
            Error::config(format!("{} in {shown}", bad.key), bad.expected, bad.got)
        })?;
        file.path = path.to_owned();
        Ok(file)
    }

    /// Parses TOML text.
    fn parse(text: &str) -> Result<Self, BadKey> {
        let at_line = |span: Option<std::ops::Range<usize>>| {
            span.map_or_else(
                || "the file".to_owned(),
                |s| format!("line {}", text[..s.start].lines().count().max(1)),
            )
        };
        let de = toml::Deserializer::parse(text).map_err(|e| BadKey {
            key: at_line(e.span()),
            expected: "valid TOML".into(),
            got: e.message().trim().to_owned(),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." {
                at_line(e.inner().span())
            } else {
                path
            };
            BadKey::from_serde(key, e.inner().message())
        })
    }

    /// Where a setting came from, for messages: `key in path`.
    pub fn key(&self, key: &str) -> String {
        format!("{key} in {}", self.path.display())
    }
}

/// A key the file got wrong.
#[derive(Debug)]
struct BadKey {
    /// `service[1].wake`, or `line 3` when serde cannot name it.
    key: String,
    expected: String,
    /// What serde saw, without quoting a string value (it may be a password).
    got: String,
}

impl BadKey {
    /// Splits serde's "invalid type: string \"x\", expected u64" into its two halves.
    fn from_serde(key: String, message: &str) -> Self {
        let message = message.trim();
        let (got, expected) = match message.find("expected ") {
            Some(at) => (
                message[..at].trim_end_matches([' ', ',']),
                &message[at + "expected ".len()..],
            ),
            None => (message, "a different value"),
        };
        let got = match got.find(" string ") {
            Some(at) => format!("{} a string", &got[..at]),
            None => got.to_owned(),
        };
        Self {
            key,
            expected: expected.to_owned(),
            got,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_and_inherits_defaults() {
        let file = ConfigFile::parse(
            r#"
            brokers = "k:9092"
            poll_max_ms = 500
            [kafka_options]
            "linger.ms" = "1"
            [[service]]
            name = "els"
            wake = "notify"
            [[service]]
            name = "bos"
            schema = "bos_outbox"
            poll_max_ms = 100
            "#,
        )
        .unwrap();
        assert_eq!(file.services.len(), 2);
        assert_eq!(file.services[0].wake, Some(Wake::Notify));
        let bos = file.services[1].options(&file);
        assert_eq!(bos.poll_max_ms, Some(100));
        let els = file.services[0].options(&file);
        assert_eq!(els.poll_max_ms, Some(500));
        assert_eq!(file.kafka_options["linger.ms"], "1");
    }

    #[test]
    fn names_the_bad_key_and_expected_form() {
        let bad = ConfigFile::parse(
            "[[service]]\nname = \"a\"\n[[service]]\nname = \"b\"\nwake = \"redi\"\n",
        )
        .unwrap_err();
        assert_eq!(bad.key, "service[1].wake");
        assert!(bad.expected.contains("redis"), "{bad:?}");
        let bad = ConfigFile::parse("pol_max_ms = 1\n").unwrap_err();
        assert!(bad.got.contains("pol_max_ms"), "{bad:?}");
        let bad = ConfigFile::parse("poll_max_ms = \"s3cret\"\n").unwrap_err();
        assert_eq!(bad.key, "poll_max_ms");
        assert!(!format!("{bad:?}").contains("s3cret"), "{bad:?}");
    }
}
