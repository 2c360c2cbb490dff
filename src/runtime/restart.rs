//! Restarting without dropping anyone (SIGUSR2). The running herald starts
//! its successor (the same executable, arguments and environment) and
//! hands it its listening sockets as a service manager would
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`); the successor says on a pipe
//! (`HERALD_READY_FD`) once every worker accepts; only then does the old
//! process stop accepting and drain. It also gets one end of a Unix
//! socket pair (`HERALD_LINK_FD`): on a single node the two processes are
//! one node through it for the length of the drain (the history handed
//! over, publishes forwarded, every message numbered once;
//! `integrations::handoff`).
//!
//! A successor whose predecessor passed no link (an older herald) and
//! finds `HISTORY_DIR`'s file held says on the pipe that it waits for it:
//! the old process then closes every connection at once and exits.
//!
//! Why inheritance rather than binding again with SO_REUSEPORT: both
//! processes accept from the very same sockets, so there is no moment when
//! the port is closed and no connection waits in a queue that closes with
//! the old process (the kernel resets those). It is also what systemd's
//! socket activation does, so one code path serves both.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// How long a successor may take to accept before the restart is given up.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// What the successor said.
pub enum Step {
    /// It (this pid) waits for the history file (`HISTORY_DIR`): release it.
    History(u32),
    /// It accepts (its pid).
    Ready(u32),
    /// It did not come up.
    Failed(String),
}

/// What a restart needs: this process's command line and a copy of each
/// listening socket with its name (`main`, `tls`, `metrics`).
pub struct Handover {
    exe: PathBuf,
    args: Vec<OsString>,
    sockets: Vec<(OwnedFd, &'static str)>,
}

impl Handover {
    /// Read at start, before the executable can be replaced on disk (a
    /// package upgrade), so that the successor is the new file at the same
    /// path.
    pub fn new(sockets: Vec<(OwnedFd, &'static str)>) -> io::Result<Handover> {
        let exe = std::env::current_exe()?;
        // A running binary replaced on disk reads as "... (deleted)".
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(s) => PathBuf::from(s),
            None => exe,
        };
        Ok(Handover {
            exe,
            args: std::env::args_os().skip(1).collect(),
            sockets,
        })
    }

    /// Starts the successor; `tell` runs on a thread of its own with each
    /// [`Step`] it takes. Returns this process's end of the link to it
    /// (see `integrations::handoff`), if it started.
    pub fn start(&self, tell: impl Fn(Step) + Send + 'static) -> Option<UnixStream> {
        match self.spawn() {
            Ok((mut child, ready, link)) => {
                let _ = std::thread::Builder::new()
                    .name("herald-restart".into())
                    .spawn(move || {
                        let mut words = std::io::BufReader::new(std::fs::File::from(ready));
                        loop {
                            match next_word(&mut words) {
                                Ok(Word::History) => tell(Step::History(child.id())),
                                Ok(Word::Ready) => return tell(Step::Ready(child.id())),
                                Err(why) => {
                                    // Not left running half-started, nor as a zombie.
                                    let _ = child.kill();
                                    let _ = child.wait();
                                    return tell(Step::Failed(why));
                                }
                            }
                        }
                    });
                Some(link)
            }
            Err(e) => {
                tell(Step::Failed(format!("cannot start the new process: {e}")));
                None
            }
        }
    }

    fn spawn(&self) -> io::Result<(std::process::Child, OwnedFd, UnixStream)> {
        let (ready_rd, ready_wr) = pipe()?;
        // Created close-on-exec: only the end placed below is inherited.
        let (link, theirs) = UnixStream::pair()?;
        let n = self.sockets.len();
        // Descriptors the child gets, in order: the sockets at 3.., then the
        // pipe's writing end, then its end of the link.
        let mut from: Vec<RawFd> = self.sockets.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        from.push(ready_wr.as_raw_fd());
        from.push(theirs.as_raw_fd());
        let mut parked = vec![0 as RawFd; from.len()];
        let names: Vec<&str> = self.sockets.iter().map(|(_, name)| *name).collect();
        let mut cmd = Command::new("/bin/sh");
        // LISTEN_PID must be the successor's pid: the shell's, which exec keeps.
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(&self.exe)
            .args(&self.args)
            .env("LISTEN_FDS", n.to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env("HERALD_READY_FD", (3 + n).to_string())
            .env("HERALD_LINK_FD", (3 + n + 1).to_string());
        use std::os::unix::process::CommandExt;
        // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and
        // exec, on descriptors this process owns; no allocation.
        unsafe {
            cmd.pre_exec(move || {
                // Park every descriptor above the targets first, so that
                // placing one never overwrites another not yet placed.
                for (i, fd) in from.iter().enumerate() {
                    parked[i] = libc::fcntl(*fd, libc::F_DUPFD, 1024);
                    if parked[i] < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for (i, fd) in parked.iter().enumerate() {
                    let target = 3 + i as RawFd;
                    if libc::dup2(*fd, target) < 0 || libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(ready_wr);
        drop(theirs);
        Ok((child, ready_rd, link))
    }
}

enum Word {
    History,
    Ready,
}

/// The successor's next word on the pipe, within [`READY_WITHIN`].
fn next_word(pipe: &mut std::io::BufReader<std::fs::File>) -> Result<Word, String> {
    use std::io::BufRead;
    if pipe.buffer().is_empty() {
        let mut pfd = libc::pollfd {
            fd: pipe.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        let n = unsafe { libc::poll(&mut pfd, 1, READY_WITHIN.as_millis() as libc::c_int) };
        if n <= 0 {
            return Err(format!(
                "the new process did not accept within {READY_WITHIN:?}"
            ));
        }
    }
    let mut line = String::new();
    let _ = pipe.read_line(&mut line);
    match line.as_str() {
        "history\n" => Ok(Word::History),
        "ready\n" => Ok(Word::Ready),
        _ => Err("the new process exited before accepting (its log says why)".into()),
    }
}

/// The pipe to the old process, in a successor (`HERALD_READY_FD`).
fn to_old() -> &'static std::sync::Mutex<Option<std::fs::File>> {
    static PIPE: std::sync::OnceLock<std::sync::Mutex<Option<std::fs::File>>> =
        std::sync::OnceLock::new();
    PIPE.get_or_init(|| {
        let fd = std::env::var("HERALD_READY_FD")
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok())
            .filter(|fd| *fd > 2 && is_pipe(*fd));
        // SAFETY: the old process passed this descriptor for this process
        // to own; taken once.
        std::sync::Mutex::new(fd.map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    })
}

/// Is this process a restart's successor?
pub fn is_successor() -> bool {
    to_old().lock().is_ok_and(|p| p.is_some())
}

/// In a successor: asks the old process to release the history file.
pub fn ask_for_history() {
    if let Ok(mut p) = to_old().lock() {
        if let Some(f) = p.as_mut() {
            let _ = std::io::Write::write_all(f, b"history\n");
        }
    }
}

/// In a successor: tells the old process, and the service manager (the
/// main pid is now this one), that it accepts.
pub fn tell_ready() {
    let Some(mut pipe) = to_old().lock().ok().and_then(|mut p| p.take()) else {
        return;
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(std::process::id())]);
    let _ = std::io::Write::write_all(&mut pipe, b"ready\n");
}

/// In a successor: its end of the link to the old process
/// (`HERALD_LINK_FD`), taken once.
pub fn take_link() -> Option<UnixStream> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let fd = std::env::var("HERALD_LINK_FD")
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2 && is_socket(*fd))?;
    if TAKEN.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return None;
    }
    // SAFETY: the old process passed this descriptor for this process to
    // own; taken once.
    let link = unsafe { UnixStream::from_raw_fd(fd) };
    // Not handed on to a later successor.
    // SAFETY: fcntl on the descriptor just taken.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(link)
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into a zeroed stat of the right size.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK }
}

/// Is `fd` an open pipe (not some descriptor a stray variable names)?
fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: fstat writes into a zeroed stat of the right size.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors this process then owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
