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
            crate::error::redact_url(database_url),
        )
    };
    let url = url::Url::parse(database_url).map_err(|_| bad("not a URL"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(bad("the scheme must be postgres"));
    }
    // Query parameters win over the URL's parts, as in sqlx (which opens every other
    // connection from the same URL); they arrive decoded.
    let param = |name: &str| {
        url.query_pairs()
            .filter(|(k, _)| k == name)
            .last()
            .map(|(_, v)| v.into_owned())
    };
    // Userinfo and path are percent-encoded; a '+' in them is a plus, not a space.
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    // The last of `host` and `hostaddr` wins, as in sqlx.
    let host = url
        .query_pairs()
        .filter(|(k, _)| k == "host" || k == "hostaddr")
        .last()
        .map(|(_, v)| v.into_owned())
        .or_else(|| url.host_str().filter(|h| !h.is_empty()).map(decode))
        .ok_or_else(|| bad("no host"))?;
    if host.starts_with('/') {
        return Err(bad(
            "a Unix socket directory as host is not supported by the WAL relay's replication \
             connection: give a TCP host",
        ));
    }
    let port = match param("port") {
        Some(p) => p.parse().map_err(|_| bad("port must be a number"))?,
        None => url.port().unwrap_or(5432),
    };
    let user = param("user").unwrap_or_else(|| match url.username() {
        "" => "postgres".to_owned(),
        u => decode(u),
    });
    let password = param("password")
        .or_else(|| url.password().map(decode))
        .unwrap_or_default();
    let database = param("dbname").unwrap_or_else(|| match url.path().trim_start_matches('/') {
        "" => user.clone(),
        path => decode(path),
    });
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
    .with_port(port)
    .with_tls(tls)
    .with_start_lsn(Lsn::ZERO))
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
    fn query_parameters_win_over_the_url_parts_as_in_sqlx() {
        let stream = WalStream::new("els").unwrap();
        let c = replication_config(
            "postgres://ignored:old@db.example:1/orders\
             ?user=app&password=p%40ss%26word&port=6543&host=replica.example&dbname=essays",
            &stream,
        )
        .unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_str(),
                c.database.as_str()
            ),
            ("replica.example", 6543, "app", "p@ss&word", "essays")
        );
        let c = replication_config("postgres:///test?host=10.0.0.7&password=s", &stream).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.password.as_str()),
            ("10.0.0.7", 5432, "s")
        );
        let e = replication_config("postgres://h/db?port=x&password=s3cret", &stream)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("port must be a number") && !e.contains("s3cret"),
            "{e}"
        );
        let e = replication_config("postgres://h/db?host=/var/run/postgresql", &stream)
            .unwrap_err()
            .to_string();
        assert!(e.contains("give a TCP host"), "{e}");
    }

    #[test]
    fn redaction_hides_a_password_in_the_userinfo_and_in_the_query() {
        for url in [
            "postgres://app:s3cret@h/db",
            "postgres://h/db?password=s3cret&sslmode=require",
            "postgres://app:s3cret@h/db?sslmode=disable&password=s3cret",
        ] {
            let shown = crate::error::redact_url(url);
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("****"), "{shown}");
        }
        assert_eq!(
            crate::error::redact_url("postgres://app@h/db?sslmode=disable"),
            "postgres://app@h/db?sslmode=disable"
        );
        let stream = WalStream::new("els").unwrap();
        let config = super::super::WalRelayConfig::new(
            "els",
            stream,
            "postgres://h/db?password=s3cret",
            crate::Environment::Testing,
        );
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("****"),
            "{shown}"
        );
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
