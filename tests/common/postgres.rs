//! A real PostgreSQL server for the database tests: Debian's `postgresql`
//! (installed by scripts/test-deps.sh), a cluster of the test's own in a
//! temporary directory, run as the unprivileged `postgres` user (the
//! server refuses root), on a loopback port of its own.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{free_port, wait_for};

pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    /// More `-c` settings the server runs with.
    settings: Vec<String>,
}

impl Postgres {
    /// A new cluster (trust authentication on loopback), started.
    pub fn start() -> Postgres {
        Self::start_with_tls(None)
    }

    /// The same, serving TLS (`ssl=on`) with this certificate and key (PEM)
    /// when given.
    pub fn start_with_tls(tls: Option<(&str, &str)>) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL (scripts/test-deps.sh installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("initdb under /usr/lib/postgresql");
        let (uid, gid) = user("postgres");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("herald-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        let mut pg = Postgres {
            child: None,
            port,
            dir,
            bin,
            uid,
            gid,
            settings: Vec::new(),
        };
        let out = pg
            .as_postgres("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(pg.dir.join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = pg.dir.join(name);
                std::fs::write(&path, pem).unwrap();
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            pg.settings = vec![
                "ssl=on".into(),
                format!("ssl_cert_file={}", pg.dir.join("server.crt").display()),
                format!("ssl_key_file={}", pg.dir.join("server.key").display()),
            ];
        }
        pg.resume();
        pg
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.uid(self.uid).gid(self.gid).current_dir(&self.dir);
        cmd
    }

    /// Starts the server (again) on its port and waits until it answers.
    pub fn resume(&mut self) {
        let child = self
            .as_postgres("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        self.child = Some(child);
        wait_for("PostgreSQL to answer", || self.client().is_ok());
    }

    /// Stops the server at once (immediate shutdown: every connection is
    /// cut, nothing is checkpointed), as a crash of the database does.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGQUIT);
            }
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn client(&self) -> Result<postgres::Client, postgres::Error> {
        postgres::Client::connect(&self.url(), postgres::NoTls)
    }

    /// Runs `sql` (several statements).
    pub fn sql(&self, sql: &str) {
        self.client()
            .and_then(|mut c| c.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The uid and gid of `name`.
fn user(name: &str) -> (u32, u32) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: getpwnam returns a pointer into static storage, read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    assert!(
        !pw.is_null(),
        "the {name} user (Debian's postgresql package makes it)"
    );
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}
