//! `chalk volume mount --metrics ADDRESS`: serves the store's metrics at
//! `GET /metrics` in the OpenMetrics text format, which Prometheus scrapes.
//!
//! The endpoint has no authentication, so it listens on loopback addresses
//! only: a workload on another host could otherwise read volume and lineage
//! names. One thread serves one connection at a time; a client that sends
//! nothing for [`REQUEST_TIMEOUT`] is dropped, so it holds up later scrapes
//! for at most that long.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chalk_engine::metrics::{Metrics, CONTENT_TYPE};

/// Time a client has to send its request headers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; a scrape request is a few hundred bytes.
const REQUEST_HEAD_MAX_BYTES: u64 = 16 * 1024;

/// Rejects an address other hosts could reach.
pub fn check_loopback(address: SocketAddr) -> anyhow::Result<()> {
    if !address.ip().is_loopback() {
        bail!(
            "--metrics address {address} is not a loopback address; the metrics endpoint has no \
             authentication, so give 127.0.0.1:PORT or [::1]:PORT"
        );
    }
    Ok(())
}

/// Binds `address` and serves `metrics` on a background thread for the rest
/// of the process. Returns the bound address, whose port is chosen by the
/// kernel when `address` gives port 0.
pub fn start(address: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    check_loopback(address)?;
    let listener = TcpListener::bind(address)
        .with_context(|| format!("failed to listen on --metrics address {address}; pick a free port"))?;
    let bound = listener.local_addr().context("failed to read the metrics listening address")?;
    std::thread::Builder::new()
        .name("chalk-metrics".to_owned())
        .spawn(move || serve(listener, &metrics))
        .context("starting the metrics thread failed")?;
    tracing::info!(address = %bound, "serving metrics at /metrics");
    Ok(bound)
}

fn serve(listener: TcpListener, metrics: &Metrics) {
    for stream in listener.incoming() {
        let result = stream.and_then(|stream| answer(stream, metrics));
        if let Err(error) = result {
            tracing::warn!(%error, "a metrics request failed");
        }
    }
}

/// Reads one request and writes one response, then closes the connection.
fn answer(stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new((&stream).take(REQUEST_HEAD_MAX_BYTES));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read and ignored, so the client sees its whole request consumed.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 0 && !header.trim_end().is_empty() {
        header.clear();
    }

    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, metrics.encode()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", format!("no page at {path}; metrics are at /metrics\n")),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", format!("method {method:?} is not allowed; use GET /metrics\n")),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nAllow: GET\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut writer = &stream;
    writer.write_all(head.as_bytes())?;
    writer.write_all(body.as_bytes())?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_check_rejects_other_addresses() {
        assert!(check_loopback("127.0.0.1:9000".parse().unwrap()).is_ok());
        assert!(check_loopback("[::1]:9000".parse().unwrap()).is_ok());
        let error = check_loopback("0.0.0.0:9000".parse().unwrap()).unwrap_err().to_string();
        assert!(error.contains("not a loopback address"), "{error}");
        assert!(check_loopback("10.1.2.3:9000".parse().unwrap()).is_err());
    }
}
