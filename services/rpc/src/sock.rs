//! Socket options every node-to-node and API connection gets.
//!
//! Why keepalive: a connection left half open by a partition or a peer's
//! power loss never errors on the side that only reads (the raft stream's
//! receiver, an idle replica connection, an API client's socket) while
//! nothing is sent on it, so its task and buffers stayed until the node
//! restarted. Probes start after [`KEEPALIVE_IDLE`] of silence. Why a user
//! timeout: on the sending side, data the peer never acknowledges would
//! otherwise be retransmitted for ~15 minutes before the socket fails; with
//! keepalive on, Linux also closes a connection whose probes have gone
//! unanswered for [`USER_TIMEOUT`], so a vanished peer's connection ends
//! about 40 s after it last answered, on either side.

use std::time::Duration;

use tokio::net::TcpStream;

/// Silence before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the kernel declares the connection dead.
pub const KEEPALIVE_PROBES: u32 = 4;
/// Longest sent data may stay unacknowledged before the socket fails.
pub const USER_TIMEOUT: Duration = Duration::from_secs(40);

/// No delay (small RPC frames go out at once), keepalive probes, and a
/// bound on unacknowledged data.
pub fn tune(tcp: &TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn both_ends_probe_a_silent_peer_and_bound_unacknowledged_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        for tcp in [&dialed.unwrap(), &accepted.unwrap().0] {
            let sock = socket2::SockRef::from(tcp);
            assert!(!sock.keepalive().unwrap(), "keepalive is on before tune");
            tune(tcp).unwrap();
            assert!(sock.keepalive().unwrap());
            assert!(tcp.nodelay().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
            assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        }
    }
}
