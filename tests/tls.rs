//! TLS on herald's port (`TLS_CERT`, `TLS_KEY`, `TLS_PORT`): real clients
//! over TLS (Python `websockets` with an `ssl` context, pusher-js with
//! `forceTLS` and the Node `pusher` library over https, curl), against a
//! certificate the test makes; plain HTTP on the TLS port and clients that
//! do not trust the certificate get a clear error, silent ones are cut;
//! SIGHUP reloads the certificate without dropping anyone; bad files stop
//! the start with exit code 2.

mod common;
#[path = "common/python.rs"]
mod python;
#[path = "common/tls.rs"]
mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tls::{TempDir, TestCa};

/// A certificate and key on disk, as an operator has them.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: TestCa,
    _dir: TempDir,
}

fn files() -> Files {
    let ca = TestCa::new();
    let dir = TempDir::new("tls-files");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    Files {
        cert,
        key,
        ca,
        _dir: dir,
    }
}

fn tls_env(f: &Files) -> Vec<(&'static str, String)> {
    vec![
        ("TLS_CERT", f.cert.to_str().unwrap().to_string()),
        ("TLS_KEY", f.key.to_str().unwrap().to_string()),
    ]
}

fn start(f: &Files, extra: &[(&str, &str)]) -> Server {
    let env = tls_env(f);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    Server::start(&all)
}

/// `curl` with `args`; (exit code, stdout).
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10"])
        .args(args)
        .output()
        .expect("curl (scripts/test-deps.sh installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The sum of a metric's samples, read over https.
fn metric(server: &Server, f: &Files, name: &str) -> f64 {
    let ca = f.ca.ca_file.to_str().unwrap();
    let url = format!("https://localhost:{}/metrics", server.addr.port());
    let (code, page) = curl(&["--cacert", ca, &url]);
    assert_eq!(code, 0, "curl {url}");
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn python_websockets_and_curl_speak_tls_to_herald() {
    let f = files();
    let server = start(&f, &[]);
    let ca = f.ca.ca_file.to_str().unwrap();
    let (code, body) = curl(&[
        "--cacert",
        ca,
        &format!("https://localhost:{}/health", server.addr.port()),
    ]);
    assert_eq!(code, 0, "curl https://");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let python = python::python_with("websockets.asyncio.client", "websockets>=13,<16");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/tls_client.py");
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    python::run_script(
        &python,
        &script,
        &[&url, ca],
        &[],
        Duration::from_secs(60),
        || server.log(),
    );
    assert!(metric(&server, &f, "herald_tls_handshakes_total") >= 3.0);
}

#[test]
fn pusher_js_with_force_tls_and_the_node_library_over_https() {
    let f = files();
    let apps = serde_json::json!([{
        "id": "tls-app", "key": "tls-key", "secret": "tls-secret", "enable_client_messages": true
    }])
    .to_string();
    let server = start(&f, &[("APPS", &apps)]);
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js.join("node_modules/pusher-js").is_dir(),
        "tests/js/node_modules: install the test dependencies with `sh scripts/test-deps.sh`"
    );
    let mut child = Command::new("node")
        .arg("public.js")
        .current_dir(&js)
        .env("HERALD_ADDR", format!("localhost:{}", server.addr.port()))
        .env("HERALD_TLS", "1")
        .env("NODE_EXTRA_CA_CERTS", &f.ca.ca_file)
        .env("APP_ID", "tls-app")
        .env("APP_KEY", "tls-key")
        .env("APP_SECRET", "tls-secret")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (scripts/test-deps.sh installs it)");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("public.js over TLS did not finish:\n{}", server.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "public.js over TLS: {err}\n{out}");
    let result = script_result(&out);
    assert_eq!(
        result["greeting"][0],
        serde_json::json!({"hello": "world"}),
        "{result}"
    );
    assert_eq!(result["trigger"]["status"], 200, "{result}");
}

#[test]
fn plain_http_on_the_tls_port_is_told_so() {
    let f = files();
    let server = start(&f, &[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("https://") && answer.contains("wss://"),
        "{answer}"
    );
    // And a plain WebSocket client gets an error, not a hang.
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let started = Instant::now();
    let req = format!("ws://{}/ws", server.addr);
    let refused = tungstenite::client::client(
        tungstenite::client::IntoClientRequest::into_client_request(req).unwrap(),
        stream,
    );
    assert!(refused.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_client_that_does_not_trust_the_certificate_fails_at_once() {
    let f = files();
    let server = start(&f, &[]);
    let url = format!("https://localhost:{}/health", server.addr.port());
    let started = Instant::now();
    let (code, _) = curl(&[&url]);
    assert_eq!(code, 60, "curl: the certificate is not trusted");
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_for("the failed handshake to be counted", || {
        metric(&server, &f, "herald_tls_handshake_failures_total") >= 1.0
    });
    // The server is fine: a trusting client gets in.
    let ca = f.ca.ca_file.to_str().unwrap();
    assert_eq!(curl(&["--cacert", ca, &url]).0, 0);
}

#[test]
fn a_silent_connection_on_the_tls_port_is_cut_after_handshake_timeout() {
    let f = files();
    let server = start(&f, &[("HANDSHAKE_TIMEOUT", "1")]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// The address after "TLS (wss://, https://) on " in the log.
fn tls_addr(server: &Server) -> SocketAddr {
    wait_for("the TLS port in the log", || {
        server.log().contains("https://) on ")
    });
    let log = server.log();
    let at = log.find("https://) on ").unwrap() + "https://) on ".len();
    log[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn tls_port_serves_tls_beside_a_plain_port() {
    let f = files();
    let server = start(&f, &[("TLS_PORT", "0")]);
    let tls = tls_addr(&server);
    assert_ne!(tls.port(), server.addr.port());
    let ca = f.ca.ca_file.to_str().unwrap();
    let (code, body) = curl(&[
        "--cacert",
        ca,
        &format!("https://localhost:{}/health", tls.port()),
    ]);
    assert_eq!(code, 0);
    assert!(body.contains("ok"));
    // The plain port stays plain.
    let mut c = Client::connect(&server, "/ws");
    c.subscribe("plain");
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_anyone() {
    let f = files();
    let server = start(&f, &[]);
    let port = server.addr.port();
    let url = format!("https://localhost:{port}/health");
    // A client connected before the reload, over TLS, kept through it.
    let python = python::python_with("websockets.asyncio.client", "websockets>=13,<16");
    let first_ca = f.ca.ca_file.to_str().unwrap().to_string();
    let mut held = std::process::Command::new(&python);
    held.arg("-c")
        .arg(
            "import asyncio,ssl,sys\n\
             from websockets.asyncio.client import connect\n\
             async def m():\n\
             \x20   ctx=ssl.create_default_context(cafile=sys.argv[2])\n\
             \x20   async with connect(sys.argv[1], ssl=ctx) as ws:\n\
             \x20       print('open', flush=True)\n\
             \x20       sys.stdin.readline()\n\
             \x20       await ws.send('{\"op\":\"ping\",\"id\":\"p\"}')\n\
             \x20       print(await asyncio.wait_for(ws.recv(), 10), flush=True)\n\
             asyncio.run(m())\n",
        )
        .arg(format!("wss://localhost:{port}/ws"))
        .arg(&first_ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut held = held.spawn().unwrap();
    let mut out = std::io::BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "open");
    // A new certificate from another CA, then SIGHUP.
    let next = TestCa::new();
    std::fs::write(&f.cert, &next.cert_pem).unwrap();
    std::fs::write(&f.key, &next.key_pem).unwrap();
    server.signal(libc::SIGHUP);
    wait_for("the reload to be logged", || {
        server.log().contains("TLS certificate reloaded")
    });
    let next_ca = next.ca_file.to_str().unwrap();
    assert_eq!(
        curl(&["--cacert", next_ca, &url]).0,
        0,
        "new handshakes: new certificate"
    );
    // (Both test CAs have the same name: curl fails on the signature, 35.)
    assert_ne!(
        curl(&["--cacert", &first_ca, &url]).0,
        0,
        "the old one is gone"
    );
    // The connection made before the reload still works.
    writeln!(held.stdin.take().unwrap()).unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("pong"), "{line}");
    assert!(held.wait().unwrap().success());
    // A broken file on SIGHUP keeps the current certificate.
    std::fs::write(&f.key, "not a key").unwrap();
    server.signal(libc::SIGHUP);
    wait_for("the failed reload to be logged", || {
        server.log().contains("not reloaded")
    });
    assert_eq!(curl(&["--cacert", next_ca, &url]).0, 0);
}

/// Runs herald expecting it to refuse to start; its stderr.
fn refused(env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .env("PORT", "0")
        .env("WORKERS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
    // One line says why (start-up warnings may come before it).
    let why: Vec<&str> = err.lines().filter(|l| l.starts_with("herald: ")).collect();
    assert_eq!(why.len(), 1, "{err}");
    why[0].to_string()
}

#[test]
fn bad_certificate_files_stop_the_start_with_a_clear_error() {
    let f = files();
    let cert = f.cert.to_str().unwrap();
    let key = f.key.to_str().unwrap();
    assert!(refused(&[("TLS_CERT", cert)]).contains("TLS_KEY"));
    assert!(refused(&[("TLS_PORT", "0")]).contains("TLS_CERT"));
    let err = refused(&[("TLS_CERT", "/nonexistent.pem"), ("TLS_KEY", key)]);
    assert!(
        err.contains("TLS_CERT") && err.contains("/nonexistent.pem"),
        "{err}"
    );
    let garbage = f._dir.0.join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let err = refused(&[("TLS_CERT", garbage.to_str().unwrap()), ("TLS_KEY", key)]);
    assert!(err.contains("TLS_CERT"), "{err}");
    let err = refused(&[("TLS_CERT", cert), ("TLS_KEY", garbage.to_str().unwrap())]);
    assert!(err.contains("TLS_KEY"), "{err}");
    // A key that is not the certificate's.
    let other = TestCa::new();
    let other_key = f._dir.0.join("other.pem");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let err = refused(&[("TLS_CERT", cert), ("TLS_KEY", other_key.to_str().unwrap())]);
    assert!(err.contains("TLS_CERT and TLS_KEY"), "{err}");
}

/// A WebSocket client over rustls, trusting `ca`.
fn tls_client(
    addr: SocketAddr,
    ca: &TestCa,
) -> tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&ca.ca_file).unwrap();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let stream = rustls::StreamOwned::new(conn, tcp);
    let req = format!("ws://localhost:{}/ws", addr.port());
    tungstenite::client::client(
        tungstenite::client::IntoClientRequest::into_client_request(req).unwrap(),
        stream,
    )
    .map(|(ws, _)| ws)
    .unwrap_or_else(|e| panic!("wss upgrade: {e}"))
}

#[test]
fn a_backlog_written_in_large_batches_arrives_whole_and_in_order() {
    let f = files();
    let server = start(&f, &[("SEND_QUEUE_LIMIT", "16MiB")]);
    let mut sub = tls_client(server.addr, &f.ca);
    sub.send(tungstenite::Message::text(
        r#"{"op":"subscribe","channel":"bulk","id":"s"}"#,
    ))
    .unwrap();
    let reply = sub.read().unwrap();
    assert!(reply.to_text().unwrap().contains("subscribed"), "{reply}");
    // The subscriber reads nothing while 4 MiB are published: the server's
    // writer then sends its queue in batches of WRITE_BUFFER_SIZE.
    let mut publisher = tls_client(server.addr, &f.ca);
    let data = "d".repeat(2000);
    const N: usize = 2000;
    for n in 0..N {
        let m = format!(r#"{{"op":"publish","channel":"bulk","data":"{n}:{data}"}}"#);
        publisher.send(tungstenite::Message::text(m)).unwrap();
    }
    for n in 0..N {
        let m = loop {
            match sub.read().unwrap() {
                tungstenite::Message::Text(t) => break t,
                _ => continue,
            }
        };
        let v: Value = serde_json::from_str(&m).unwrap();
        let d = v["data"].as_str().unwrap();
        assert_eq!(d, format!("{n}:{data}"), "message {n}");
    }
}

#[test]
fn a_client_coming_back_resumes_its_session_on_any_worker() {
    // Stateless tickets: a returning client skips the key exchange,
    // whichever worker accepts it (several tries land on both).
    let f = files();
    let server = start(&f, &[]);
    let python = python::python_with("websockets.asyncio.client", "websockets>=13,<16");
    let script = "import socket, ssl, sys\n\
        ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
        def get(session=None):\n\
        \x20   s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', int(sys.argv[1]))), server_hostname='localhost', session=session)\n\
        \x20   s.sendall(b'GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
        \x20   assert s.recv(4096).startswith(b'HTTP/1.1 200')\n\
        \x20   r = (s.session, s.session_reused)\n\
        \x20   s.close()\n\
        \x20   return r\n\
        session, reused = get()\n\
        assert not reused\n\
        print(sum(get(session)[1] for _ in range(8)))\n";
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(server.addr.port().to_string())
        .arg(&f.ca.ca_file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "8", "{err}");
}

#[test]
fn an_https_publish_with_a_large_body_arrives_whole() {
    // The request may come in the handshake's last flight: what rustls
    // does not take at once waits in the session, nothing is dropped.
    let f = files();
    let server = start(&f, &[]);
    let mut sub = tls_client(server.addr, &f.ca);
    sub.send(tungstenite::Message::text(
        r#"{"op":"subscribe","channel":"big","id":"s"}"#,
    ))
    .unwrap();
    assert!(sub
        .read()
        .unwrap()
        .to_text()
        .unwrap()
        .contains("subscribed"));
    let data = "b".repeat(40_000);
    let body = f._dir.0.join("body.json");
    std::fs::write(&body, format!(r#"{{"channel":"big","data":"{data}"}}"#)).unwrap();
    let ca = f.ca.ca_file.to_str().unwrap();
    let url = format!("https://localhost:{}/publish", server.addr.port());
    let at_body = format!("@{}", body.display());
    let (code, answer) = curl(&[
        "--cacert",
        ca,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &at_body,
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(answer.contains("\"ok\":true"), "{answer}");
    let m = sub.read().unwrap();
    let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
    assert_eq!(v["data"].as_str().map(str::len), Some(40_000));
}
