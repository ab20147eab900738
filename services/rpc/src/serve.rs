//! One accept loop for every TLS listener (node RPC and REST API): TLS
//! handshake with a deadline, then HTTP/1.1 or HTTP/2 on the same socket,
//! or a [`RawProtocol`] when the handshake chose its ALPN id. A client that
//! fails the handshake (plaintext, wrong CA, garbage) is logged and dropped;
//! nothing else is disturbed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server-side TLS connection, handshake done.
pub type ServerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A protocol other than HTTP served on a TLS listener: a connection whose
/// handshake negotiated one of [`RawProtocol::alpns`] is handed to it whole.
pub trait RawProtocol: Send + Sync + 'static {
    /// The ALPN ids (versions of the protocol); the listener's TLS config
    /// must offer them too, newest first.
    fn alpns(&self) -> &'static [&'static [u8]];
    /// Serves one connection to its end.
    fn serve(
        &self,
        stream: ServerStream,
        peer: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// Serves `router` on `listener` over TLS until `shutdown` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: axum::Router,
    listener_name: &'static str,
    shutdown: watch::Receiver<bool>,
) {
    serve_tls_with(listener, tls, router, Vec::new(), listener_name, shutdown).await
}

/// [`serve_tls`] that also hands a connection whose handshake chose an ALPN
/// id of one of the `raw` protocols to that protocol.
pub async fn serve_tls_with(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: axum::Router,
    raw: Vec<Arc<dyn RawProtocol>>,
    listener_name: &'static str,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let raw: Arc<[Arc<dyn RawProtocol>]> = raw.into();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = listener_name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = crate::sock::tune(&tcp) {
            tracing::debug!(listener = listener_name, %peer, error = %e, "socket options not set");
        }
        let acceptor = acceptor.clone();
        let router = router.clone();
        let raw = raw.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(listener = listener_name, %peer, error = %e,
                        "dropping connection: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(listener = listener_name, %peer,
                        "dropping connection: TLS handshake timed out");
                    return;
                }
            };
            let chosen = tls.get_ref().1.alpn_protocol();
            let raw = chosen.and_then(|c| raw.iter().find(|r| r.alpns().contains(&c)));
            if let Some(raw) = raw {
                raw.serve(tls, peer).await;
                return;
            }
            let svc = TowerToHyperService::new(router);
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .max_concurrent_streams(1024)
                .initial_stream_window_size(crate::STREAM_WINDOW)
                .initial_connection_window_size(crate::CONNECTION_WINDOW)
                .max_frame_size(crate::MAX_FRAME)
                .max_send_buf_size(crate::CONNECTION_WINDOW as usize);
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(listener = listener_name, %peer, error = %e, "connection ended with error");
            }
        });
    }
}
