//! A private PostgreSQL for one scenario, made with `initdb` in a temporary directory and
//! listening on a port of its own, so crashing it, restarting it or changing server
//! settings (`wal_level=logical`) costs no other test its database.

use std::io::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A PostgreSQL cluster of one's own; stopped and deleted when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    base: PathBuf,
    port: u16,
    settings: Vec<(String, String)>,
    /// Run the server programs as the `postgres` OS user: they refuse to run as root.
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Creates the cluster (trust authentication, user `postgres`) and starts it.
    ///
    /// # Errors
    /// When the server programs are missing (set `OUTPOST_PG_BIN` to their directory, or
    /// run `make services`), or `initdb`/`pg_ctl` fail.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with server settings (`-c name=value`), e.g.
    /// `[("wal_level", "logical")]`, kept across restarts.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self> {
        let bin = bin_dir().map_err(|e| {
            Error::other(format!(
                "a private PostgreSQL needs the server programs (initdb, pg_ctl): set \
                 OUTPOST_PG_BIN to their directory, or run `make services` ({e})"
            ))
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let base = std::env::temp_dir().join(format!("outpost-faults-pg-{port}"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base)?;
        let as_postgres = is_root();
        if as_postgres {
            let uid = id("-u")?;
            let gid = id("-g")?;
            std::os::unix::fs::chown(&base, Some(uid), Some(gid)).map_err(|e| {
                Error::other(format!(
                    "cannot hand {} to the postgres user: {e}",
                    base.display()
                ))
            })?;
        }
        let pg = Self {
            bin,
            base,
            port,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        pg.start_again()?;
        Ok(pg)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it cleanly (`fast`: open sessions are ended, a shutdown checkpoint is written).
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn stop(&self) -> Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// Stops it the way a crash does: `immediate` skips the shutdown checkpoint, so the
    /// next start replays the WAL, and every open connection breaks.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn crash(&self) -> Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"])
    }

    /// Starts it (again) and waits until it accepts connections.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn start_again(&self) -> Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c shared_buffers=32MB",
            self.port,
            self.base.display()
        );
        for (name, value) in &self.settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let log = self.base.join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        )
    }

    fn data(&self) -> String {
        self.base.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&path);
            cmd
        } else {
            Command::new(&path)
        };
        let out = cmd
            .args(args)
            .current_dir(&self.base)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::other(format!("cannot run {}: {e}", path.display())))?;
        if !out.status.success() {
            return Err(Error::other(format!(
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.crash();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// `OUTPOST_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian's layout), else
/// `pg_config --bindir`.
fn bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("OUTPOST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_initdb(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output()?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !has_initdb(&bin) {
        return Err(Error::other(format!("no initdb in {}", bin.display())));
    }
    Ok(bin)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `id -u postgres` or `id -g postgres`.
fn id(which: &str) -> Result<u32> {
    let out = Command::new("id").args([which, "postgres"]).output()?;
    if !out.status.success() {
        return Err(Error::other(
            "running as root, the private PostgreSQL runs as the `postgres` OS user, and there is none",
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(Error::other)
}
