//! Non-blocking reads on a socket's raw descriptor, shared by plain
//! connections ([`super::tcp`]) and TLS ones ([`super::tls`]): the reactor
//! says when a socket is readable; these read what is there without
//! waiting.

use std::io;

/// One non-blocking `recv` into `buf`: `Ok(Some(0))` at EOF, `Ok(None)`
/// when nothing is there (would block).
pub fn recv_now(fd: i32, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}
