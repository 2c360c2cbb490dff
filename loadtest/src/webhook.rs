//! `webhook`: a fast authorizer for benchmarks. Answers every HTTP/1.1
//! request on a loopback address with `200 OK` and an empty body, keeping
//! connections alive, so herald's AUTHORIZER_URL can point at something
//! whose own cost is small and known. Stops after `--duration` seconds or
//! on SIGTERM and prints (JSON) how many requests it answered and its CPU
//! per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::procstat;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Address to listen on (loopback only); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Seconds to run before exiting (at most 3600).
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub requests: u64,
    pub connections: u64,
    pub cpu_ns_per_request: Option<f64>,
}

/// Where a complete request head ends, if it does.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The Content-Length of a request head (0 if absent).
fn content_length(head: &[u8]) -> anyhow::Result<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).context("bad request head")?;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            return std::str::from_utf8(h.value)?
                .trim()
                .parse()
                .context("bad Content-Length");
        }
    }
    Ok(0)
}

async fn serve(mut s: TcpStream, requests: Arc<AtomicU64>) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        // Answer every complete request buffered, then read more.
        let mut answers = 0;
        while let Some(end) = head_end(&buf) {
            let len = content_length(&buf[..end])?;
            if buf.len() < end + len {
                break;
            }
            buf.drain(..end + len);
            answers += 1;
        }
        if answers > 0 {
            let one = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            let out: Vec<u8> = one.repeat(answers);
            s.write_all(&out).await?;
            requests.fetch_add(answers as u64, Ordering::Relaxed);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub async fn run(a: Args) -> anyhow::Result<Report> {
    if !a.listen.ip().is_loopback() {
        bail!("--listen must be a loopback address");
    }
    if !(a.duration > 0.0 && a.duration <= 3600.0) {
        bail!("--duration must be in (0, 3600]");
    }
    let listener = TcpListener::bind(a.listen).await?;
    eprintln!("webhook listening on {}", listener.local_addr()?);
    let requests = Arc::new(AtomicU64::new(0));
    let mut connections = 0u64;
    let cpu0 = procstat::self_cpu_secs();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.duration);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = term.recv() => break,
            r = listener.accept() => {
                let (s, _) = r?;
                connections += 1;
                let requests = requests.clone();
                tokio::spawn(async move {
                    let _ = serve(s, requests).await;
                });
            }
        }
    }
    let n = requests.load(Ordering::Relaxed);
    let cpu = procstat::self_cpu_secs() - cpu0;
    Ok(Report {
        scenario: "webhook",
        requests: n,
        connections,
        cpu_ns_per_request: (n > 0).then(|| (cpu * 1e9 / n as f64).round()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_lengths() {
        let req = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST";
        let end = head_end(req).unwrap();
        assert_eq!(&req[end..end + 5], b"hello");
        assert_eq!(content_length(&req[..end]).unwrap(), 5);
        assert_eq!(head_end(b"POST / HTTP/1.1\r\n"), None);
        assert_eq!(content_length(b"GET / HTTP/1.1\r\n\r\n").unwrap(), 0);
    }
}
