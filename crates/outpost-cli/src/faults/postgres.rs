//! A private PostgreSQL for one scenario, made with `initdb` in a temporary directory and
//! listening on a port of its own, so crashing it costs no other test its database.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

/// A PostgreSQL cluster of one's own; stopped and deleted when dropped.
pub(super) struct PrivatePostgres {
    bin: PathBuf,
    base: PathBuf,
    port: u16,
    /// Run the server programs as the `postgres` OS user: they refuse to run as root.
    as_postgres: bool,
}

impl PrivatePostgres {
    /// Creates the cluster (trust authentication, user `postgres`) and starts it.
    pub fn start() -> anyhow::Result<Self> {
        let bin = bin_dir().context(
            "faults start a PostgreSQL of their own and need its server programs \
             (initdb, pg_ctl): set OUTPOST_PG_BIN to their directory, or run `make services`",
        )?;
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
            std::os::unix::fs::chown(&base, Some(uid), Some(gid))
                .with_context(|| format!("cannot hand {} to the postgres user", base.display()))?;
        }
        let pg = Self {
            bin,
            base,
            port,
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

    /// Stops it the way a crash does: `immediate` skips the shutdown checkpoint, so the
    /// next start replays the WAL, and every open connection breaks.
    pub fn crash(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"])
    }

    /// Starts it (again) and waits until it accepts connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c shared_buffers=32MB",
            self.port,
            self.base.display()
        );
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

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
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
            .with_context(|| format!("cannot run {}", path.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
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
fn bin_dir() -> anyhow::Result<PathBuf> {
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
    anyhow::ensure!(has_initdb(&bin), "no initdb in {}", bin.display());
    Ok(bin)
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `id -u postgres` or `id -g postgres`.
fn id(which: &str) -> anyhow::Result<u32> {
    let out = Command::new("id").args([which, "postgres"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "running as root, the private PostgreSQL runs as the `postgres` OS user, and there is none"
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
