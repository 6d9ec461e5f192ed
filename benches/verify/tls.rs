//! TLS and mTLS: connections over them and new handshakes per second.

use super::*;

/// `n` HTTP/2 connections over TLS with `config`.
pub(super) async fn connect_tls(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    n: usize,
) -> Vec<Connection> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let channel = support::tls::channel(Arc::clone(config), addr).await;
        conns.push(Connection {
            health: HealthClient::new(channel.clone()),
            verify: KeyVerifyClient::new(channel.clone()),
            check: AuthorizationClient::new(channel),
        });
    }
    conns
}

/// New TLS handshakes per second: `dialers` tasks each connecting,
/// handshaking and closing in a loop for `duration`. Client and server
/// share the machine, so this is the pair's rate, not the server's alone.
pub(super) async fn handshake_rate(
    config: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    dialers: usize,
    duration: Duration,
) -> (f64, usize) {
    let stop_at = Instant::now() + duration;
    let failures = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..dialers)
        .map(|_| {
            let (config, failures) = (Arc::clone(config), Arc::clone(&failures));
            tokio::spawn(async move {
                let mut done = 0usize;
                while Instant::now() < stop_at {
                    match support::tls::handshake(&config, addr).await {
                        Ok(stream) => {
                            done += 1;
                            drop(stream);
                        }
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total as f64 / duration.as_secs_f64(), failures.load(Ordering::Relaxed))
}

/// Warm Verify over TLS and mTLS, each on its own replica (connection sets
/// 1 and 2).
pub(super) fn tls_scenarios(keys: &Arc<Vec<String>>) -> Vec<Scenario> {
    vec![
        Scenario::new("warm Verify ALLOW over TLS", "allow-tls", verify(keys, "sales:read", "10.1.2.3"), 1),
        Scenario::new("warm Verify ALLOW over mTLS", "allow-mtls", verify(keys, "sales:read", "10.1.2.3"), 2),
    ]
}

/// The TLS targets against plaintext warm ALLOW, then new handshakes per
/// second on each TLS replica.
pub(super) async fn tls_report(
    over_tls: &[(&str, Option<Outcome>); 2],
    warm_allow: &Outcome,
    servers: [(&str, &Server, &Arc<rustls::ClientConfig>); 2],
    cores: usize,
) {
    for (name, o) in over_tls.iter().filter_map(|(name, o)| o.as_ref().map(|o| (name, o))) {
        let r = o.throughput() / warm_allow.throughput();
        println!(
            "| warm ALLOW over {name} ≥ 0.9 × plaintext (persistent connections) | {:.0}/s vs {:.0}/s = {r:.2} × | {} |",
            o.throughput(),
            warm_allow.throughput(),
            verdict(r >= 0.9)
        );
    }
    println!();
    let dialers = cores * 4;
    for (name, server, client) in servers {
        let (rate, failed) = handshake_rate(client, server.addr, dialers, Duration::from_secs(3)).await;
        println!(
            "new {name} 1.3 handshakes (ECDSA P-256, ring; client and server on this machine, {dialers} dialers): {rate:.0}/s, {failed} failed"
        );
    }
}
