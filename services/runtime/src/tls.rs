//! TLS (rustls with ring) for the gRPC servers and clients, from PEM files named by flags.
//!
//! A server given `--tls-cert` and `--tls-key` speaks only TLS, and with `--tls-client-ca` only to
//! clients holding a certificate signed by that CA (mutual TLS). A client trusts exactly the CA
//! of `--tls-ca`, never a built-in root store. Files are read and checked once, at start, so a
//! wrong path or a file that is not PEM stops the process with a message naming the flag and the
//! path instead of failing every connection later. An `https://` URL without a CA is refused, and
//! so are TLS flags with an `http://` URL: a configuration is never silently downgraded to
//! plaintext.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// Longest time a server waits for a client to finish the TLS handshake, so that connections
/// that never complete one do not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS of a gRPC server; every flag can also be set through its environment variable.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServerTls {
    /// PEM certificate chain the gRPC server presents; with --tls-key, the server speaks only
    /// TLS [default: none, plaintext].
    #[arg(long, env = "VAAS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "VAAS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle of the clients: when set, only clients presenting a certificate signed by
    /// it are served (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "VAAS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Returns a gRPC server builder that speaks TLS as configured (plaintext when no TLS flag
    /// is set), and whether it does.
    pub fn server_builder(&self) -> Result<(tonic::transport::Server, bool), TlsError> {
        let server = tonic::transport::Server::builder();
        match self.server_config()? {
            Some(tls) => Ok((server.tls_config(tls).map_err(TlsError::Refused)?, true)),
            None => Ok((server, false)),
        }
    }

    /// Reads and checks the files into a server TLS configuration; returns `None` when no TLS
    /// flag is set (plaintext).
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.tls_client_ca.is_some() {
                    return Err(TlsError::Needs {
                        given: "--tls-client-ca",
                        needed: "--tls-cert and --tls-key",
                    });
                }
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err(TlsError::Needs {
                    given: "--tls-cert",
                    needed: "--tls-key",
                });
            }
            (None, Some(_)) => {
                return Err(TlsError::Needs {
                    given: "--tls-key",
                    needed: "--tls-cert",
                });
            }
        };
        let mut config = ServerTlsConfig::new()
            .identity(read_identity(("--tls-cert", cert), ("--tls-key", key))?)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(client_ca) = &self.tls_client_ca {
            config = config.client_ca_root(read_certificates("--tls-client-ca", client_ca)?);
        }
        // rustls checks here what PEM parsing cannot: that the key belongs to the certificate
        // and that the client CA is a usable trust anchor.
        Server::builder()
            .tls_config(config.clone())
            .map_err(TlsError::Refused)?;
        Ok(Some(config))
    }
}

/// TLS of a gRPC client; every flag can also be set through its environment variable.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientTls {
    /// PEM CA bundle to trust for https:// URLs; the only CA trusted (no system roots)
    /// [default: none, only http:// URLs work].
    #[arg(long, env = "VAAS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain presented to a server that asks for one (mutual TLS).
    #[arg(long, env = "VAAS_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "VAAS_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTls {
    /// Reads and checks the files into a client TLS configuration; returns `None` when no TLS
    /// flag is set. The server name checked against the certificate is each URL's host.
    pub fn client_config(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert, key)),
            (Some(_), None) => {
                return Err(TlsError::Needs {
                    given: "--tls-client-cert",
                    needed: "--tls-client-key",
                });
            }
            (None, Some(_)) => {
                return Err(TlsError::Needs {
                    given: "--tls-client-key",
                    needed: "--tls-client-cert",
                });
            }
        };
        let Some(ca) = &self.tls_ca else {
            if identity.is_some() {
                return Err(TlsError::Needs {
                    given: "--tls-client-cert",
                    needed: "--tls-ca",
                });
            }
            return Ok(None);
        };
        let mut config = ClientTlsConfig::new().ca_certificate(read_certificates("--tls-ca", ca)?);
        if let Some((cert, key)) = identity {
            config = config.identity(read_identity(
                ("--tls-client-cert", cert),
                ("--tls-client-key", key),
            )?);
        }
        Ok(Some(config))
    }
}

/// Returns an endpoint for `url`: over TLS with `tls` for `https://`, plaintext for `http://`.
/// Refuses `https://` without TLS configuration and `http://` with one, rather than connect in a
/// way the operator did not ask for.
pub fn client_endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, TlsError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| TlsError::Url {
        url: url.to_owned(),
        source,
    })?;
    match (endpoint.uri().scheme_str(), tls) {
        (Some("https"), Some(tls)) => {
            // tonic verifies the certificate against the URL's host (an IP address or a name).
            endpoint
                .tls_config(tls.clone())
                .map_err(|source| TlsError::Endpoint {
                    url: url.to_owned(),
                    source,
                })
        }
        (Some("https"), None) => Err(TlsError::HttpsWithoutCa {
            url: url.to_owned(),
        }),
        (Some("http"), None) => Ok(endpoint),
        (Some("http"), Some(_)) => Err(TlsError::HttpWithTls {
            url: url.to_owned(),
        }),
        _ => Err(TlsError::Scheme {
            url: url.to_owned(),
        }),
    }
}

/// Reads a PEM certificate chain and its PEM private key.
fn read_identity(
    cert: (&'static str, &Path),
    key: (&'static str, &Path),
) -> Result<Identity, TlsError> {
    let cert_pem = read_certificates(cert.0, cert.1)?;
    let (flag, path) = key;
    let key_pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
        flag,
        path: path.to_owned(),
        what: "private key",
        source,
    })?;
    Ok(Identity::from_pem(cert_pem.into_inner(), key_pem))
}

/// Reads a file of one or more PEM certificates.
fn read_certificates(flag: &'static str, path: &Path) -> Result<Certificate, TlsError> {
    let pem = read(flag, path)?;
    let pem_error = |source| TlsError::Pem {
        flag,
        path: path.to_owned(),
        what: "certificate",
        source,
    };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certificates.is_empty() {
        return Err(pem_error(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(Certificate::from_pem(pem))
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// A TLS configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A flag was given without the ones it goes with.
    #[error("{given} needs {needed}")]
    Needs {
        /// The flag given.
        given: &'static str,
        /// What is missing.
        needed: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read {flag} {}", path.display())]
    Read {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{flag} {} holds no valid PEM {what}", path.display())]
    Pem {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the certificates and key (for example a key of another certificate).
    #[error("the tls certificate, key or client ca is refused")]
    Refused(#[source] tonic::transport::Error),
    /// A URL is not a valid URI.
    #[error("invalid url {url:?}")]
    Url {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// A URL is neither `http://` nor `https://`.
    #[error("url {url:?} must start with http:// or https://")]
    Scheme {
        /// The URL.
        url: String,
    },
    /// An `https://` URL without a CA to trust.
    #[error("https:// needs --tls-ca (the CA that signed the server's certificate): {url:?}")]
    HttpsWithoutCa {
        /// The URL.
        url: String,
    },
    /// An `http://` URL while TLS flags are set.
    #[error("tls flags are set but {url:?} is plaintext http://: use https://")]
    HttpWithTls {
        /// The URL.
        url: String,
    },
    /// tonic refused the TLS configuration for a URL.
    #[error("cannot use tls for {url:?}")]
    Endpoint {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

#[cfg(test)]
mod tests {
    use vaas_testkit::TlsFiles;

    use super::*;

    fn client_tls(files: &TlsFiles) -> ClientTls {
        ClientTls {
            tls_ca: Some(files.ca_cert()),
            tls_client_cert: Some(files.client_cert()),
            tls_client_key: Some(files.client_key()),
        }
    }

    fn server_tls(files: &TlsFiles) -> ServerTls {
        ServerTls {
            tls_cert: Some(files.server_cert()),
            tls_key: Some(files.server_key()),
            tls_client_ca: Some(files.ca_cert()),
        }
    }

    #[test]
    fn an_https_url_without_a_ca_is_refused_not_downgraded() {
        let no_tls = ClientTls::default()
            .client_config()
            .expect("no flags is plaintext");
        assert!(no_tls.is_none());
        let error = client_endpoint("https://scheduler.example:50052", no_tls.as_ref())
            .expect_err("https without a CA");
        assert!(
            matches!(error, TlsError::HttpsWithoutCa { .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().starts_with("https:// needs --tls-ca"),
            "{error}"
        );
    }

    #[test]
    fn an_http_url_with_tls_flags_is_refused() -> anyhow::Result<()> {
        let files = TlsFiles::generate()?;
        let tls = client_tls(&files).client_config()?;
        let error = client_endpoint("http://127.0.0.1:50052", tls.as_ref())
            .expect_err("TLS flags with an http URL");
        assert!(matches!(error, TlsError::HttpWithTls { .. }), "{error:?}");
        Ok(())
    }

    #[test]
    fn https_with_a_ca_and_http_without_one_are_accepted() -> anyhow::Result<()> {
        let files = TlsFiles::generate()?;
        let tls = client_tls(&files).client_config()?;
        assert!(tls.is_some());
        client_endpoint("https://127.0.0.1:50052", tls.as_ref())?;
        client_endpoint("https://[::1]:50052", tls.as_ref())?;
        client_endpoint("http://127.0.0.1:50052", None)?;
        let error = client_endpoint("ftp://127.0.0.1:50052", None).expect_err("ftp");
        assert!(matches!(error, TlsError::Scheme { .. }), "{error:?}");
        Ok(())
    }

    #[test]
    fn a_client_certificate_without_a_ca_is_refused() -> anyhow::Result<()> {
        let files = TlsFiles::generate()?;
        let tls = ClientTls {
            tls_ca: None,
            ..client_tls(&files)
        };
        let error = tls.client_config().expect_err("client cert without CA");
        assert_eq!(error.to_string(), "--tls-client-cert needs --tls-ca");
        Ok(())
    }

    #[test]
    fn a_server_with_cert_key_and_client_ca_gets_mutual_tls() -> anyhow::Result<()> {
        let files = TlsFiles::generate()?;
        assert!(server_tls(&files).server_config()?.is_some());
        assert!(ServerTls::default().server_config()?.is_none());
        Ok(())
    }

    #[test]
    fn incomplete_server_flags_are_refused() -> anyhow::Result<()> {
        let files = TlsFiles::generate()?;
        for (tls, message) in [
            (
                ServerTls {
                    tls_key: None,
                    ..server_tls(&files)
                },
                "--tls-cert needs --tls-key",
            ),
            (
                ServerTls {
                    tls_cert: None,
                    ..server_tls(&files)
                },
                "--tls-key needs --tls-cert",
            ),
            (
                ServerTls {
                    tls_client_ca: Some(files.ca_cert()),
                    ..ServerTls::default()
                },
                "--tls-client-ca needs --tls-cert and --tls-key",
            ),
        ] {
            let error = tls.server_config().expect_err(message);
            assert_eq!(error.to_string(), message);
        }
        Ok(())
    }

    #[test]
    fn unreadable_or_wrong_files_are_named_with_their_flag() -> anyhow::Result<()> {
        let files = TlsFiles::generate()?;
        let missing = files.ca_cert().with_file_name("missing.pem");
        let error = ServerTls {
            tls_cert: Some(missing.clone()),
            ..server_tls(&files)
        }
        .server_config()
        .expect_err("missing file");
        assert_eq!(
            error.to_string(),
            format!("cannot read --tls-cert {}", missing.display())
        );

        // A certificate where the key belongs.
        let error = ServerTls {
            tls_key: Some(files.server_cert()),
            ..server_tls(&files)
        }
        .server_config()
        .expect_err("a certificate as key");
        assert_eq!(
            error.to_string(),
            format!(
                "--tls-key {} holds no valid PEM private key",
                files.server_cert().display()
            )
        );

        // A key where the CA belongs.
        let error = ClientTls {
            tls_ca: Some(files.client_key()),
            ..ClientTls::default()
        }
        .client_config()
        .expect_err("a key as CA");
        assert_eq!(
            error.to_string(),
            format!(
                "--tls-ca {} holds no valid PEM certificate",
                files.client_key().display()
            )
        );

        // The client's key with the server's certificate.
        let error = ServerTls {
            tls_key: Some(files.client_key()),
            ..server_tls(&files)
        }
        .server_config()
        .expect_err("a key of another certificate");
        assert!(matches!(error, TlsError::Refused(_)), "{error:?}");
        Ok(())
    }
}
