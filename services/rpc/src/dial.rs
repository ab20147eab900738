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
            crate::sock::tune(&tcp)?;
            let name = ServerName::try_from(NODE_SERVER_NAME)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A client-side TLS connection, handshake done.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens a mutually authenticated TLS connection to `addr` offering only
/// the ALPN ids `alpns` (versions of one protocol, newest first); the
/// stream says which one the peer chose. `Ok(None)`: the peer speaks none
/// of them (an older version refuses the handshake, or completes it
/// without choosing one).
pub async fn connect_alpn(
    addr: &str,
    tls: &ClientConfig,
    alpns: &[&[u8]],
    timeout: Duration,
) -> std::io::Result<Option<ClientStream>> {
    let mut cfg = tls.clone();
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let name = ServerName::try_from(NODE_SERVER_NAME)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        crate::sock::tune(&tcp)?;
        TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
    };
    let stream = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let refused = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::AlertReceived(
                            rustls::AlertDescription::NoApplicationProtocol
                        )
                    )
                });
            return if refused { Ok(None) } else { Err(e) };
        }
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            ))
        }
    };
    if !stream
        .get_ref()
        .1
        .alpn_protocol()
        .is_some_and(|c| alpns.contains(&c))
    {
        return Ok(None);
    }
    Ok(Some(stream))
}
