//! Serving the API over TCP with the limits a public endpoint needs: at most
//! `node.connections_max` connections at once (more wait in the listen backlog, so a
//! flood of idle sockets cannot exhaust the node's file descriptors), a header-read
//! timeout (`node.header_read_timeout`, so a slow client cannot hold a connection
//! without sending a request), and a graceful stop that lets answers in flight finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// File descriptors kept for the store, the watchers and captures, beyond connections.
const DESCRIPTORS_RESERVED: u64 = 1024;

/// Raises the soft limit on open files to the hard limit (as servers do) and returns how
/// many connections fit under it with room for everything else; at most `wanted`.
pub fn connections_that_fit(wanted: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return wanted;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit struct through a pointer to a live local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let fit = usize::try_from(limit.rlim_cur.saturating_sub(DESCRIPTORS_RESERVED))
        .unwrap_or(usize::MAX)
        .max(1);
    if fit < wanted {
        tracing::warn!(
            wanted,
            fit,
            "node.connections_max is above what the open-file limit allows; serving {fit} connections at once"
        );
    }
    wanted.min(fit)
}

/// How long a stopping node waits for answers in flight.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// After an accept error (e.g. out of file descriptors), wait this long before retrying.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

pub struct ServeLimits {
    pub connections_max: usize,
    pub header_read_timeout: Duration,
    /// Serve over TLS with this configuration.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("node.tls_cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("node.tls_key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS with node.tls_cert and node.tls_key: {0}")]
    Config(String),
}

/// The TLS configuration from PEM files of a certificate chain and its private key.
pub fn tls_config(
    files: &kairos_config::TlsFiles,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|error| cert_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| cert_error(error.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| TlsError::Key {
        path: files.key.display().to_string(),
        reason: error.to_string(),
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed; retrying");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        match &limits.tls {
            None => {
                let connection =
                    graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                let watcher = graceful.watcher();
                let http = http.clone();
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    // The handshake is bounded like the headers: a silent client is dropped.
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let connection = http.serve_connection(TokioIo::new(stream), service);
                            if let Err(error) = watcher.watch(connection).await {
                                tracing::debug!(%error, "connection ended with an error");
                            }
                        }
                        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(STOP_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("answers still in flight after {STOP_WAIT:?}; stopping anyway");
    }
    Ok(())
}
