//! The replication connection's settings, from the same PostgreSQL URL the rest of Outpost
//! uses (sqlx's options do not give the password back, and the replication client needs it).

use pgwire_replication::{Lsn, ReplicationConfig, TlsConfig};

use super::WalStream;
use crate::error::{Error, Result};

/// Builds the replication client's settings from a PostgreSQL URL.
pub(crate) fn replication_config(
    database_url: &str,
    stream: &WalStream,
) -> Result<ReplicationConfig> {
    let bad = |why: &str| {
        Error::config(
            "database_url",
            format!("postgres://user[:password]@host[:port]/database ({why})"),
            redact(database_url),
        )
    };
    let url = url::Url::parse(database_url).map_err(|_| bad("not a URL"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(bad("the scheme must be postgres"));
    }
    let host = url.host_str().ok_or_else(|| bad("no host"))?.to_owned();
    // Userinfo and path are percent-encoded; a '+' in them is a plus, not a space.
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = match url.username() {
        "" => "postgres".to_owned(),
        u => decode(u),
    };
    let password = url.password().map(decode).unwrap_or_default();
    let database = url.path().trim_start_matches('/');
    let database = if database.is_empty() {
        user.clone()
    } else {
        decode(database)
    };
    let tls = match url
        .query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned())
        .as_deref()
    {
        None | Some("disable" | "allow" | "prefer") => TlsConfig::disabled(),
        Some(other) => {
            return Err(bad(&format!(
                "sslmode={other} is not supported by the WAL relay's replication connection"
            )))
        }
    };
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        stream.slot(),
        stream.publication(),
    )
    .with_port(url.port().unwrap_or(5432))
    .with_tls(tls)
    .with_start_lsn(Lsn::ZERO))
}

/// The URL without its password, for error messages.
pub(crate) fn redact(database_url: &str) -> String {
    match url::Url::parse(database_url) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            url.to_string()
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_becomes_the_replication_settings() {
        let stream = WalStream::new("els").unwrap();
        let c = replication_config("postgres://app:p%40ss+word@db.example:6543/orders", &stream)
            .unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_str()
            ),
            ("db.example", 6543, "app", "p@ss+word")
        );
        assert_eq!(
            (c.database.as_str(), c.slot.as_str()),
            ("orders", "outpost_els")
        );
        let c = replication_config("postgresql://127.0.0.1/test", &stream).unwrap();
        assert_eq!((c.port, c.user.as_str()), (5432, "postgres"));
    }

    #[test]
    fn a_bad_url_is_refused_naming_the_setting_without_the_password() {
        let stream = WalStream::new("els").unwrap();
        for url in [
            "postgres://app:secret@db/orders?sslmode=require",
            "mysql://app:secret@db/orders",
            "not a url",
        ] {
            let e = replication_config(url, &stream).unwrap_err().to_string();
            assert!(e.starts_with("invalid setting database_url"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
