//! Dialing peers: a lazily connected tonic channel over mTLS. The TLS server
//! name is always [`NODE_SERVER_NAME`], so any node certificate signed by the
//! cluster CA is accepted whatever address the peer is reached at.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::NODE_SERVER_NAME;
use crate::TlsError;

/// A channel to `addr` (host:port) that connects on first use and reconnects
/// after failures. `request_timeout` bounds every call; `None` for channels
/// that carry long-lived streams (a stream is a call that lasts), whose
/// callers bound their unary calls themselves. Keep-alives find dead peers
/// either way.
pub fn mtls_channel(
    addr: &str,
    tls: Arc<ClientConfig>,
    request_timeout: Option<Duration>,
) -> Result<Channel, TlsError> {
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| TlsError::BadAddress(addr.to_string()))?
        .connect_timeout(Duration::from_secs(2));
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    let endpoint = endpoint
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(crate::STREAM_WINDOW)
        .initial_connection_window_size(crate::CONNECTION_WINDOW);
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_string();
            let port = uri.port_u16().unwrap_or(7100);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(NODE_SERVER_NAME)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}
