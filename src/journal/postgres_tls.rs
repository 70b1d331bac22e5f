//! TLS for the PostgreSQL journal: libpq's `sslmode` and `sslrootcert`, on rustls.
//!
//! tokio-postgres reads `sslmode` as `disable`, `prefer` or `require` and refuses every other
//! word and `sslrootcert`; libpq, and so every connection string written for `psql`, PgBouncer
//! or Terraform's `pg` backend, also has `verify-ca` and `verify-full`, and the file of root
//! certificates they check against. This module reads those two parameters out of the URL,
//! hands tokio-postgres the rest (`verify-*` as `require`: TLS or nothing), and builds the
//! rustls configuration that checks what libpq checks:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | – |
//! | `prefer` (the default) | when the server offers it | not checked, as libpq; chained to `sslrootcert` when one is given |
//! | `require` | always | the same |
//! | `verify-ca` | always | chained to `sslrootcert` |
//! | `verify-full` | always | chained to `sslrootcert`, and naming the host connected to |
//!
//! `sslrootcert` is a PEM file, or `system` for the operating system's roots (as libpq 16).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How much of the server's certificate a connection checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing: the connection is encrypted, not authenticated (libpq's `prefer` and `require`
    /// without a root certificate).
    Nothing,
    /// That it chains to a root of `sslrootcert` (`verify-ca`).
    Chain,
    /// That, and that it names the host (`verify-full`).
    Full,
}

/// A connection string as tokio-postgres reads it, and the TLS it asks for.
pub(crate) struct Tls {
    /// The connection string without `sslrootcert`, with `verify-*` spelled `require`.
    pub conninfo: String,
    /// What connects: rustls, checking what the string asked for.
    pub connector: MakeRustlsConnect,
}

/// Reads `sslmode` and `sslrootcert` out of `conninfo` (a URL, or libpq's `key=value` form) and
/// builds the connector. The error is a sentence for the user, without the connection string.
pub(crate) fn configure(conninfo: &str) -> Result<Tls, String> {
    let is_url = conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://");
    let (conninfo, mode, root) = if is_url {
        from_url(conninfo)?
    } else {
        from_key_values(conninfo)?;
        (conninfo.to_owned(), None, None)
    };
    let check = match (mode.as_deref(), &root) {
        (Some("verify-full"), Some(_)) => Check::Full,
        (Some("verify-ca"), Some(_)) => Check::Chain,
        (Some(mode @ ("verify-full" | "verify-ca")), None) => {
            return Err(format!(
                "sslmode={mode} needs the roots to check the server against: add sslrootcert=<a PEM file> or sslrootcert=system"
            ));
        }
        (_, Some(_)) => Check::Chain,
        (_, None) => Check::Nothing,
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let webpki = match root {
        Some(root) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&root)?), provider.clone())
                .build()
                .map_err(|e| format!("the roots of sslrootcert cannot check a server: {e}"))?,
        ),
        None => None,
    };
    let verifier = Arc::new(Verifier { check, provider: provider.clone(), webpki });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Tls { conninfo, connector: MakeRustlsConnect::new(config) })
}

/// The URL without `sslrootcert`, `verify-*` spelled `require`; the `sslmode` and
/// `sslrootcert` it had. Only the query is rewritten: the rest stays as the user wrote it
/// (several hosts, a socket directory, percent-escapes).
#[allow(clippy::type_complexity)]
fn from_url(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => return Ok((url.to_owned(), None, None)),
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" => root = Some(percent_decoded(value)?),
            "sslmode" => {
                let value = percent_decoded(value)?;
                match value.as_str() {
                    "verify-ca" | "verify-full" => kept.push("sslmode=require".to_owned()),
                    _ => kept.push(pair.to_owned()),
                }
                mode = Some(value);
            }
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(format!(
                    "{key}: client certificates are not supported by this journal; authenticate with a password (SCRAM)"
                ));
            }
            _ => kept.push(pair.to_owned()),
        }
    }
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    Ok((out, mode, root))
}

/// A URL query value with its `%XX` escapes decoded (as libpq does: `+` stays a plus).
fn percent_decoded(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = value
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("the URL's query has a bad %-escape near {:?}", &value[i..]))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's query decodes to bytes that are not UTF-8".to_owned())
}

/// libpq's `key=value` form goes to tokio-postgres as it is, which reads `sslmode` up to
/// `require`; what it cannot read gets a sentence saying where it can be written.
fn from_key_values(conninfo: &str) -> Result<(), String> {
    let asks = conninfo.split_whitespace().any(|pair| {
        let pair = pair.to_ascii_lowercase();
        pair.starts_with("sslrootcert") || pair.starts_with("sslmode=verify-") || pair.starts_with("sslmode='verify-")
    });
    if asks {
        return Err("sslrootcert and sslmode=verify-ca or verify-full are read from a postgres:// URL; \
                    write the connection string as one (postgres://user@host/db?sslmode=verify-full&sslrootcert=…)"
            .to_owned());
    }
    Ok(())
}

/// The roots `sslrootcert` names: `system`, or a PEM file of certificates.
fn roots(root: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    if root == "system" {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(format!(
                "sslrootcert=system: no root certificate found on this machine{}",
                found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default()
            ));
        }
        return Ok(store);
    }
    let certs = CertificateDer::pem_file_iter(root)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert {root:?} cannot be read as PEM certificates: {e}"))?;
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("sslrootcert {root:?} holds no certificate"));
    }
    Ok(store)
}

/// Checks the server's certificate as far as `check` says, and always that the server holds
/// its key (the handshake's signatures): with [`Check::Nothing`] the connection is encrypted,
/// not authenticated (libpq's `prefer` and `require`).
#[derive(Debug)]
struct Verifier {
    check: Check,
    provider: Arc<CryptoProvider>,
    /// The roots' verifier, for [`Check::Chain`] and [`Check::Full`].
    webpki: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // `verify-ca`: webpki checks the chain first, so a name error means the chain held.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_loses_sslrootcert_and_verify_modes_become_require() {
        let (url, mode, root) = from_url(
            "postgres://ci:pw@h1:5432,h2:5433/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(url, "postgres://ci:pw@h1:5432,h2:5433/db?sslmode=require&application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));

        let (url, mode, root) = from_url("postgresql://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!((url.as_str(), mode, root), ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", None, None));

        let (url, mode, _) = from_url("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!((url.as_str(), mode.as_deref()), ("postgres://h/db?sslmode=disable", Some("disable")));

        let (url, _, root) = from_url("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!((url.as_str(), root.as_deref()), ("postgres://h/db", Some("system")));

        let (_, _, root) = from_url("postgres://h/db?sslrootcert=/a+b%20c.pem#frag").unwrap();
        assert_eq!(root.as_deref(), Some("/a+b c.pem"));
        assert!(from_url("postgres://h/db?sslrootcert=%zz").is_err());
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_a_sentence() {
        let refused = |conninfo: &str| configure(conninfo).err().unwrap_or_else(|| panic!("{conninfo} accepted"));
        assert!(refused("postgres://h/db?sslmode=verify-full").contains("sslrootcert=system"));
        assert!(refused("postgres://h/db?sslmode=verify-ca").contains("sslrootcert"));
        assert!(refused("postgres://h/db?sslcert=/c.pem").contains("client certificates"));
        assert!(
            refused("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .contains("/nonexistent/ca.pem")
        );
        assert!(refused("host=h sslmode=verify-full").contains("postgres:// URL"));
        assert!(refused("host=h sslrootcert=/ca.pem").contains("postgres:// URL"));
        let text = refused("postgres://ci:s3cret@h/db?sslmode=verify-ca");
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn a_pem_file_without_a_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("idem-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!("postgres://h/db?sslmode=verify-full&sslrootcert={}", empty.display());
        let error = configure(&url).err().expect("an empty root file refused");
        assert!(error.contains("holds no certificate"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_plain_modes_connect_unchecked_and_keep_the_string() {
        for conninfo in ["postgres://h/db", "postgres://h/db?sslmode=require", "host=h sslmode=require"] {
            let tls = configure(conninfo).unwrap();
            assert_eq!(tls.conninfo, conninfo);
        }
    }
}
