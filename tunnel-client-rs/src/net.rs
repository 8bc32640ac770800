//! Opening the WebSocket to the runner: name resolution, TCP connect, optional TLS, the HTTP upgrade with
//! the bearer token.
//!
//! The TCP connection is made here rather than by tungstenite so that it gets a timeout and TCP_NODELAY
//! (small control frames such as CONNECTED and WINDOW must not sit behind Nagle), and so that names in
//! `/etc/hosts` resolve even where the static binary's getaddrinfo cannot load glibc's NSS modules (a
//! busybox container has none).

use crate::config::Config;
use log::debug;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header::AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest message we accept. Our peers send at most a read chunk plus the header, but a runner may batch
/// more: 64 MiB is generous and still bounds memory.
const MAX_MESSAGE: usize = 64 << 20;

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256 * 1024)
        .write_buffer_size(256 * 1024)
        // Bounded so a runner that stops reading cannot make us buffer without limit; larger than
        // write_buffer_size plus the largest frame we send, as tungstenite requires.
        .max_write_buffer_size(16 << 20)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// The TLS connector for wss:// URLs (web PKI roots plus `--ca-file`), `None` for ws://.
pub fn tls_connector(cfg: &Config) -> Result<Option<Connector>, String> {
    if !cfg.runner_url.starts_with("wss://") {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("--ca-file {}: no PEM certificates found", path.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Connector::Rustls(Arc::new(tls))))
}

/// Connect and upgrade. The error is a one-line reason for the log.
pub async fn connect(cfg: &Config, tls: Option<Connector>) -> Result<Ws, String> {
    let url = cfg.tunnel_url();
    let mut request = url.as_str().into_client_request().map_err(|e| format!("bad url {url}: {e}"))?;
    if let Some(token) = &cfg.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| format!("bad token: {e}"))?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let uri = request.uri().clone();
    let host = uri.host().ok_or_else(|| format!("no host in {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("wss") { 443 } else { 80 });

    let deadline = cfg.connect_timeout;
    let work = async {
        let addrs = resolve(host, port).await?;
        let stream = connect_any(&addrs).await?;
        let _ = stream.set_nodelay(true);
        bound_unsent(&stream);
        let (ws, response) = tokio_tungstenite::client_async_tls_with_config(request, stream, Some(ws_config()), tls)
            .await
            .map_err(|e| describe_handshake_error(&e))?;
        debug!("upgrade accepted: HTTP {}", response.status());
        Ok(ws)
    };
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {:.1} s", deadline.as_secs_f64())))
}

/// Bytes written to the WebSocket's socket that may wait there unsent (`TCP_NOTSENT_LOWAT`), as the runner
/// sets on its side. Without a bound the kernel's send buffer grows to megabytes while the runner is
/// busy, and an express frame written after bulk data waits behind all of it; with it the bulk data waits
/// in the writer's queues, which the express lane overtakes. The writer refills the socket as it drains.
const UNSENT_AT_MOST: libc::c_int = 64 * 1024;

fn bound_unsent(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let value = UNSENT_AT_MOST;
    // SAFETY: a valid descriptor and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        debug!("TCP_NOTSENT_LOWAT: {}", std::io::Error::last_os_error());
    }
}

fn describe_handshake_error(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(resp) => {
            let status = resp.status();
            let hint = match status.as_u16() {
                401 | 403 => " (is KOHAKURIVER_TUNNEL_TOKEN right for this container?)",
                404 => " (does the runner know this container?)",
                _ => "",
            };
            format!("runner refused the upgrade: HTTP {status}{hint}")
        }
        other => format!("websocket handshake failed: {other}"),
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut errors = Vec::new();
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(format!("connect to {addr}: {e}")),
        }
    }
    if errors.is_empty() {
        errors.push("no addresses".into());
    }
    Err(errors.join("; "))
}

/// IP literals directly, then /etc/hosts, then the system resolver.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    // A small local file: reading it inline is cheaper than a trip to the blocking pool.
    if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
        let found = hosts_lookup(&text, host);
        if !found.is_empty() {
            return Ok(found.into_iter().map(|ip| SocketAddr::new(ip, port)).collect());
        }
    }
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(Duration::from_secs(5), lookup).await {
        Ok(Ok(addrs)) => {
            let v: Vec<_> = addrs.collect();
            if v.is_empty() {
                Err(format!("{host}: no addresses"))
            } else {
                Ok(v)
            }
        }
        Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
        Err(_) => Err(format!("cannot resolve {host}: timed out")),
    }
}

/// Addresses for `name` in hosts(5) text, IPv4 first (the container network is IPv4).
pub fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let ip = fields.next()?.parse::<IpAddr>().ok()?;
            fields.any(|n| n.eq_ignore_ascii_case(name)).then_some(ip)
        })
        .collect();
    out.sort_by_key(|ip| ip.is_ipv6());
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_websocket_socket_keeps_little_unsent() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        bound_unsent(&stream);
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor and an out-parameter of the stated size.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(value, UNSENT_AT_MOST);
    }

    #[test]
    fn hosts_file() {
        let text = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n# 10.0.0.1 runner\n172.30.0.1 runner gw # c\n";
        assert_eq!(hosts_lookup(text, "runner"), vec!["172.30.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(hosts_lookup(text, "localhost").len(), 2);
        assert!(hosts_lookup(text, "10.0.0.1").is_empty());
    }
}
