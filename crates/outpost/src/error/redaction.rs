//! Redaction: secrets kept out of error messages and `Debug` output.

use std::collections::BTreeMap;

/// What a hidden secret shows as.
const HIDDEN: &str = "****";

/// `url` with its passwords hidden, for error messages and logs: the one in its userinfo
/// (`redis://default:****@host:6379`) and a `password` query parameter
/// (`postgres://h/db?password=****`, which PostgreSQL clients accept as well). Text that
/// does not parse as a URL keeps only what follows its credentials.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if !parsed.cannot_be_a_base() => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some(HIDDEN));
            }
            if parsed.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" { HIDDEN.into() } else { v };
                        (k.into_owned(), v.into_owned())
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        // Not a URL. A `password` keyword's value goes (a PostgreSQL keyword/value string,
        // `host=h user=u password=pw`, which a database URL setting may be given); then, as
        // parsers disagree on where a malformed URL's credentials end (`app:pw@host` is a
        // scheme and a path to some), everything up to the last `@` may be one.
        _ => {
            let text = redact_keywords(url);
            match text.rsplit_once('@') {
                Some((credentials, host)) => {
                    let scheme = credentials
                        .find("://")
                        .map_or("", |i| &credentials[..i + 3]);
                    format!("{scheme}{HIDDEN}@{host}")
                }
                None => text,
            }
        }
    }
}

/// `text` with the value of each `password` keyword hidden (quoted or not, spaces around
/// `=` allowed, as libpq reads them).
fn redact_keywords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("password") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let after_key = &from["password".len()..];
        let value = after_key.trim_start();
        let Some(value) = value.strip_prefix('=') else {
            out.push_str("password");
            rest = after_key;
            continue;
        };
        let value = value.trim_start();
        let end = match value.strip_prefix('\'') {
            // Past the closing quote.
            Some(quoted) => unescaped_end(quoted, |c| c == '\'').map_or(value.len(), |i| i + 2),
            None => unescaped_end(value, char::is_whitespace).unwrap_or(value.len()),
        };
        out.push_str("password=");
        out.push_str(HIDDEN);
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// Where the first character of `text` that `ends` accepts is, not counting one a backslash
/// escapes.
fn unescaped_end(text: &str, ends: impl Fn(char) -> bool) -> Option<usize> {
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if ends(c) {
            return Some(i);
        }
    }
    None
}

/// What a librdkafka property's `value` shows as in messages: hidden when the property may
/// hold a secret.
pub(crate) fn shown_property<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_property(key) {
        HIDDEN
    } else {
        value
    }
}

/// Whether the librdkafka property `key` may hold a secret (`sasl.password`,
/// `ssl.key.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`, ...).
fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "sasl", "key"]
        .iter()
        .any(|word| key.contains(word))
}

/// librdkafka properties with the values of those that may hold a secret hidden, for
/// `Debug` output.
pub(crate) fn redact_properties(properties: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    properties
        .iter()
        .map(|(key, value)| {
            let shown = if is_secret_property(key) {
                HIDDEN
            } else {
                value.as_str()
            };
            (key.as_str(), shown)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_keeps_everything_but_its_password() {
        assert_eq!(
            redact_url("rediss://default:s3cret@cache.example:6380/0"),
            "rediss://default:****@cache.example:6380/0"
        );
        assert_eq!(
            redact_url("redis://:s3cret@127.0.0.1"),
            "redis://:****@127.0.0.1"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://app@host/1"), "redis://app@host/1");
        for url in [
            "postgres://h/db?password=s3cret&sslmode=require",
            "postgres://app:s3cret@h/db?sslmode=disable&password=s3cret",
        ] {
            let shown = redact_url(url);
            assert!(
                !shown.contains("s3cret") && shown.contains("****"),
                "{shown}"
            );
        }
        assert_eq!(
            redact_url("postgres://app@h/db?sslmode=disable"),
            "postgres://app@h/db?sslmode=disable"
        );
        // Not URLs (a space in the port, no scheme): the credentials go all the same.
        let bad = redact_url("redis://app:s3cret@host:63 79");
        assert!(!bad.contains("s3cret"), "{bad}");
        assert_eq!(redact_url("app:s3cret@host"), "****@host");
        assert_eq!(redact_url("nope"), "nope");
    }

    #[test]
    fn a_keyword_value_string_keeps_everything_but_its_password() {
        assert_eq!(
            redact_url("host=h user=u password=s3cret dbname=test"),
            "host=h user=u password=**** dbname=test"
        );
        assert_eq!(
            redact_url("host=h password = 's3 cr\\'et' port=5432"),
            "host=h password=**** port=5432"
        );
        assert_eq!(redact_url("dbname=test"), "dbname=test");
        assert_eq!(redact_url("password=s3cret"), "password=****");
        assert_eq!(
            redact_url("password=s3\\ cret port=1"),
            "password=**** port=1"
        );
        // Malformed URLs with a query: their credentials still go.
        for url in [
            "app:s3cret@db/app?sslmode=require",
            "postgresql//app:s3cret@db/app?sslmode=require",
            "password=s3cret://y",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("s3cret"), "{url}: {shown}");
        }
    }

    #[test]
    fn secret_properties_are_hidden() {
        let properties = BTreeMap::from([
            ("sasl.password".to_owned(), "s3cret".to_owned()),
            (
                "sasl.oauthbearer.client.secret".to_owned(),
                "s3cret".to_owned(),
            ),
            ("ssl.key.pem".to_owned(), "s3cret".to_owned()),
            ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
        ]);
        let shown = redact_properties(&properties);
        assert_eq!(shown["security.protocol"], "SASL_SSL");
        assert!(!format!("{shown:?}").contains("s3cret"), "{shown:?}");
    }
}
