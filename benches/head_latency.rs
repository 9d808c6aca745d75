//! Manifest HEAD latency of two HTTPS endpoints under the same load, for hack/bench-front.sh
//! (`cargo bench --bench head_latency`; not a test, so not in the test run).
//!
//! 16 clients (`HEAD_CLIENTS`), each on its own keep-alive TLS connection, send `HEAD PATH`
//! and time each answer from the first byte written to the end of the headers. A client
//! waits an exponential think time between requests (mean `THINK_US` µs, seeded per client,
//! so the clients are independent, as nodes are); `THINK_US=0` sends back to back, which
//! measures queueing at saturation. The endpoints (`TARGETS`, `name=https://host:port,…`)
//! are measured in `ROUNDS` rounds of `REQUESTS` requests per client, alternating which goes
//! first, so that the machine's drift falls on both. Printed: per round p50/p99 of each,
//! then the medians over rounds and the per-round difference of the second to the first.
//!
//! The client is deliberately small (HTTP/1.1 written by hand over tokio-rustls, one thread):
//! a HEAD answer has no body, and every microsecond the client spends is on both sides.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Target {
    name: String,
    addr: String,
}

struct Load {
    clients: usize,
    requests: usize,
    think_us: u64,
    request: Arc<Vec<u8>>,
    tls: TlsConnector,
}

/// One client: connects, then sends `requests` HEADs; returns each one's latency.
async fn client(load: &Load, addr: &str, seed: u64) -> io::Result<Vec<Duration>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("127.0.0.1").expect("an IP is a server name");
    let mut tls = load.tls.connect(name, tcp).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(load.requests);
    for _ in 0..load.requests {
        if load.think_us > 0 {
            // Exponential: -ln(U) × mean.
            let u: f64 = rng.r#gen::<f64>().max(1e-12);
            let wait = (-u.ln() * load.think_us as f64) as u64;
            tokio::time::sleep(Duration::from_micros(wait)).await;
        }
        let start = Instant::now();
        tls.write_all(&load.request).await?;
        let mut filled = 0;
        loop {
            let n = tls.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Err(io::Error::other("connection closed mid-answer"));
            }
            filled += n;
            if buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            if filled == buf.len() {
                return Err(io::Error::other("answer headers too large"));
            }
        }
        out.push(start.elapsed());
        let head = &buf[..filled];
        if !head.starts_with(b"HTTP/1.1 200") {
            let line = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(head));
            return Err(io::Error::other(format!("answered {line}")));
        }
        if !head.ends_with(b"\r\n\r\n") {
            return Err(io::Error::other("bytes after the headers of a HEAD answer"));
        }
    }
    Ok(out)
}

/// p50 and p99 in ms of one side's round.
async fn measure(load: &Load, target: &Target, round: usize) -> io::Result<(f64, f64)> {
    let tasks = (0..load.clients).map(|c| client(load, &target.addr, (round * 1000 + c) as u64));
    let mut all = Vec::new();
    for result in futures::future::join_all(tasks).await {
        all.extend(result.map_err(|e| io::Error::other(format!("{}: {e}", target.name)))?);
    }
    all.sort();
    let q = |f: f64| all[((all.len() - 1) as f64 * f) as usize].as_secs_f64() * 1000.0;
    Ok((q(0.5), q(0.99)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to choose.
    let targets: Vec<Target> = std::env::var("TARGETS")
        .expect("TARGETS=name=https://127.0.0.1:port,name=https://127.0.0.1:port")
        .split(',')
        .map(|t| {
            let (name, url) = t.split_once('=').expect("TARGETS: name=URL");
            let addr = url
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_string();
            Target {
                name: name.to_string(),
                addr,
            }
        })
        .collect();
    assert_eq!(targets.len(), 2, "TARGETS names two endpoints");
    let ca = std::env::var("CA_FILE").expect("CA_FILE: the endpoints' CA (PEM)");
    let path = std::env::var("HEAD_PATH").unwrap_or_else(|_| "/v2/bench/manifests/v1".into());
    let auth = std::env::var("AUTHORIZATION").unwrap_or_default();
    let rounds: usize = env_or("ROUNDS", 20);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).expect("CA_FILE readable") {
        roots
            .add(cert.expect("CA_FILE: PEM"))
            .expect("CA_FILE: a certificate");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut request = format!(
        "HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n"
    );
    if !auth.is_empty() {
        request.push_str(&format!("Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let load = Load {
        clients: env_or("HEAD_CLIENTS", 16),
        requests: env_or("REQUESTS", 1000),
        think_us: env_or("THINK_US", 0),
        request: Arc::new(request.into_bytes()),
        tls: TlsConnector::from(Arc::new(config)),
    };
    // One thread, as a lean load generator: the rest of the cores are the servers'.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows = runtime.block_on(async {
        // Warm-up: connections, TLS, a front's credential cache.
        for t in &targets {
            measure(&load, t, 0).await.unwrap_or_else(|e| panic!("{e}"));
        }
        let mut rows = Vec::new();
        for round in 1..=rounds {
            let order: [usize; 2] = if round % 2 == 1 { [0, 1] } else { [1, 0] };
            let mut row = [(0.0, 0.0); 2];
            for i in order {
                row[i] = measure(&load, &targets[i], round)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            println!(
                "round {round:>2}: {} p50 {:.3} p99 {:.3} ms, {} p50 {:.3} p99 {:.3} ms",
                targets[0].name, row[0].0, row[0].1, targets[1].name, row[1].0, row[1].1
            );
            rows.push(row);
        }
        rows
    });
    let col = |i: usize, p99: bool| {
        median(
            rows.iter()
                .map(|r| if p99 { r[i].1 } else { r[i].0 })
                .collect(),
        )
    };
    let mut added99: Vec<f64> = rows.iter().map(|r| r[1].1 - r[0].1).collect();
    added99.sort_by(f64::total_cmp);
    let added50 = median(rows.iter().map(|r| r[1].0 - r[0].0).collect());
    let (a, b) = (&targets[0].name, &targets[1].name);
    println!(
        "summary: {} clients, think {} us, {rounds} rounds x {} requests per client; medians over rounds: \
         {a} p50 {:.3} p99 {:.3} ms; {b} p50 {:.3} p99 {:.3} ms; added p50 {:+.3} ms, p99 {:+.3} ms \
         (per-round range {:+.3} to {:+.3}); p99 ratio {:.2}",
        load.clients,
        load.think_us,
        load.requests,
        col(0, false),
        col(0, true),
        col(1, false),
        col(1, true),
        added50,
        median(added99.clone()),
        added99[0],
        added99[added99.len() - 1],
        col(1, true) / col(0, true),
    );
}
