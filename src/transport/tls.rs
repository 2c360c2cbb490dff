//! TLS on herald's port (`TLS_CERT`, `TLS_KEY`): rustls in user space.
//! The handshake runs before the HTTP request is read; afterwards a
//! connection's [`Session`] decrypts what its reader receives and
//! encrypts what its writer sends, one record stream per connection (the
//! published frame is still encoded once; encryption is per subscriber,
//! as the keys are).
//!
//! The certificate and key are read from PEM files at start and again on
//! SIGHUP ([`Certified::reload`]); connections already open keep theirs.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, RwLock};

use monoio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use super::socket::recv_now;

/// Why TLS cannot be set up, or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS_CERT {path}: {why}")]
    Cert { path: PathBuf, why: String },
    #[error("TLS_KEY {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("TLS_CERT and TLS_KEY do not go together: {0}")]
    Mismatch(String),
    #[error("plain HTTP on the TLS port")]
    PlainHttp,
    #[error("{0}")]
    Handshake(String),
    #[error("the peer closed during the handshake")]
    Closed,
}

/// The server's certificate, replaced as a whole on reload.
pub struct Certified {
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Arc<ServerConfig>>,
}

impl Certified {
    /// Reads the PEM files (a chain, leaf first; a PKCS#8, PKCS#1 or SEC1
    /// key) and checks that they match.
    pub fn load(cert: &Path, key: &Path) -> Result<Certified, TlsError> {
        let config = server_config(cert, key)?;
        Ok(Certified {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            config: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on an error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.to_path_buf(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.to_path_buf(),
            why: "no CERTIFICATE block in the file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        why: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Stateless resumption: a client coming back (to any worker) skips
    // the key exchange.
    if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(config)
}

/// The first bytes of a plain HTTP request (someone forgot https://).
fn looks_like_http(b: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
    ];
    b.len() >= 4 && METHODS.contains(&&b[..4])
}

/// Waits until `tcp` is readable and reads what is there into `raw`;
/// `Ok(0)` at EOF.
async fn recv_some(tcp: &TcpStream, raw: &mut [u8]) -> io::Result<usize> {
    loop {
        tcp.readable(false).await?;
        if let Some(n) = recv_now(tcp.as_raw_fd(), raw)? {
            return Ok(n);
        }
    }
}

/// Writes what rustls has to send.
async fn flush(tcp: &mut TcpStream, conn: &mut ServerConnection) -> Result<(), TlsError> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
    }
    if out.is_empty() {
        return Ok(());
    }
    use monoio::io::AsyncWriteRentExt;
    let (res, _) = tcp.write_all(out).await;
    res.map(|_| ()).map_err(|_| TlsError::Closed)
}

/// The server's side of a handshake on `tcp` (the caller bounds it in
/// time). Plain HTTP gets a plain 400 saying so.
pub async fn accept(tcp: &mut TcpStream, config: Arc<ServerConfig>) -> Result<Session, TlsError> {
    let mut conn = ServerConnection::new(config).map_err(|e| TlsError::Handshake(e.to_string()))?;
    let mut raw = vec![0u8; 16 * 1024];
    let mut first = true;
    // What arrived after the handshake (the start of the request) and
    // rustls did not take yet: the session's first bytes to decrypt.
    let mut after = Vec::new();
    while conn.is_handshaking() {
        if conn.wants_write() {
            flush(tcp, &mut conn).await?;
            continue;
        }
        let n = recv_some(tcp, &mut raw)
            .await
            .map_err(|_| TlsError::Closed)?;
        if n == 0 {
            return Err(TlsError::Closed);
        }
        if first && looks_like_http(&raw[..n]) {
            let body = "this port speaks TLS: use https:// or wss://\n";
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            use monoio::io::AsyncWriteRentExt;
            let _ = tcp.write_all(answer.into_bytes()).await;
            return Err(TlsError::PlainHttp);
        }
        first = false;
        let mut data = &raw[..n];
        if let Err(e) = feed_some(&mut conn, &mut data) {
            // The alert tells the client why.
            let _ = flush(tcp, &mut conn).await;
            return Err(TlsError::Handshake(e.to_string()));
        }
        after.extend_from_slice(data);
    }
    flush(tcp, &mut conn).await?;
    // A write's records are taken out at once (`seal`): rustls need not
    // cap what it holds (its 64 KiB default would refuse a large batch).
    conn.set_buffer_limit(None);
    Ok(Session {
        conn: RefCell::new(conn),
        raw: RefCell::new(after),
        out: RefCell::new(Vec::new()),
    })
}

/// Hands records from the front of `data` to rustls until it has
/// decrypted bytes to give (it holds at most 16 KiB of them) or `data` is
/// used up.
fn feed_some(conn: &mut ServerConnection, data: &mut &[u8]) -> io::Result<()> {
    let bad = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    while !data.is_empty() {
        let state = conn.process_new_packets().map_err(bad)?;
        if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
            break;
        }
        if conn.read_tls(data)? == 0 {
            break;
        }
    }
    conn.process_new_packets().map_err(bad)?;
    Ok(())
}

/// An established TLS connection, shared by its reader and writer.
pub struct Session {
    conn: RefCell<ServerConnection>,
    /// Received bytes rustls did not take yet (it decrypts 16 KiB at a
    /// time); empty for most reads.
    raw: RefCell<Vec<u8>>,
    /// The writer's record buffer, kept between writes.
    out: RefCell<Vec<u8>>,
}

/// A shared [`Session`].
pub type Shared = Rc<Session>;

impl Session {
    /// Reads what is there now from socket `fd`, decrypted, into `buf`:
    /// `Some(0)` at the end (EOF or close_notify), `None` when nothing is
    /// (would block). An error means the peer sent something that is not
    /// TLS (the connection is done).
    pub fn read_now(&self, fd: i32, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut conn = self.conn.borrow_mut();
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let mut raw = self.raw.borrow_mut();
            if !raw.is_empty() {
                let mut data = &raw[..];
                feed_some(&mut conn, &mut data)?;
                let used = raw.len() - data.len();
                raw.drain(..used);
                if used == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS records rustls does not take",
                    ));
                }
                continue;
            }
            // Received into `buf`, which the decrypted bytes then fill.
            let n = match recv_now(fd, buf)? {
                None => return Ok(None),
                Some(0) => return Ok(Some(0)),
                Some(n) => n,
            };
            let mut data = &buf[..n];
            feed_some(&mut conn, &mut data)?;
            raw.extend_from_slice(data);
        }
    }

    /// Are decrypted (or received, not yet decrypted) bytes waiting? Then
    /// the connection is readable without the socket.
    pub fn has_pending(&self) -> bool {
        if !self.raw.borrow().is_empty() {
            return true;
        }
        let mut conn = self.conn.borrow_mut();
        conn.process_new_packets()
            .is_ok_and(|s| s.plaintext_bytes_to_read() > 0 || s.peer_has_closed())
    }

    /// Encrypts `frames` into records, with whatever rustls had to send on
    /// its own first; returns them in the session's reused buffer (give
    /// it back with [`Session::recycle`]).
    pub fn seal<'a>(&self, frames: impl IntoIterator<Item = &'a [u8]>) -> io::Result<Vec<u8>> {
        thread_local! {
            /// Frames of one write gathered into one plaintext, so that
            /// they go out in as few records (AEAD operations, rustls
            /// allocations) as 16 KiB allows: per thread, not per
            /// connection.
            static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let mut conn = self.conn.borrow_mut();
        let mut out = std::mem::take(&mut *self.out.borrow_mut());
        out.clear();
        let mut frames = frames.into_iter();
        let first = frames.next().unwrap_or_default();
        match frames.next() {
            None => conn.writer().write_all(first)?,
            Some(second) => GATHER.with_borrow_mut(|plain| {
                plain.clear();
                plain.extend_from_slice(first);
                plain.extend_from_slice(second);
                for f in frames {
                    plain.extend_from_slice(f);
                }
                let res = conn.writer().write_all(plain);
                if plain.capacity() > 1 << 20 {
                    *plain = Vec::new();
                }
                res
            })?,
        }
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        Ok(out)
    }

    /// Takes back a written record buffer for the next write (one larger
    /// than a few records is dropped: an idle connection keeps little).
    pub fn recycle(&self, mut out: Vec<u8>) {
        if out.capacity() <= 4 * 1024 {
            out.clear();
            *self.out.borrow_mut() = out;
        }
    }
}
