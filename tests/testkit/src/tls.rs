//! A throwaway certificate authority for TLS tests, as PEM files in a temporary directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate, both
/// signed by the CA, each written as PEM; the files are removed on drop.
#[derive(Debug)]
pub struct TlsFiles {
    dir: TempDir,
}

impl TlsFiles {
    /// Generates fresh keys and certificates (ECDSA P-256) and writes them.
    pub fn generate() -> anyhow::Result<TlsFiles> {
        let dir = tempfile::Builder::new()
            .prefix("vaas-tls-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let files = TlsFiles { dir };

        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "VaaS test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        write(&files.ca_cert(), &ca_cert.pem())?;
        let issuer = Issuer::new(ca_params, ca_key);

        for (name, subject_alt_names, purpose, cert_path, key_path) in [
            (
                "localhost",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
                ExtendedKeyUsagePurpose::ServerAuth,
                files.server_cert(),
                files.server_key(),
            ),
            (
                "vaas-test-client",
                vec!["vaas-test-client".to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
                files.client_cert(),
                files.client_key(),
            ),
        ] {
            let mut params = CertificateParams::new(subject_alt_names)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![purpose];
            params.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write(&cert_path, &cert.pem())?;
            write(&key_path, &key.serialize_pem())?;
        }
        Ok(files)
    }

    /// Returns the CA certificate (PEM), the one clients and mutual-TLS servers trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Returns the server certificate (PEM), valid for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// Returns the server certificate's private key (PEM, PKCS#8).
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// Returns the client certificate (PEM), for mutual TLS.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// Returns the client certificate's private key (PEM, PKCS#8).
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client-key.pem")
    }
}

fn write(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))
}
