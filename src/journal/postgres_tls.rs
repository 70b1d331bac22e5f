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

/// A connection string as tokio-postgres reads it, and the TLS it asks for.
pub(crate) struct Tls {
    /// The connection string, read: without `sslrootcert`, `verify-*` as `require`, and no
    /// TLS asked for when every host is a Unix socket.
    pub config: tokio_postgres::Config,
    /// What connects: rustls, checking what the string asked for.
    pub connector: MakeRustlsConnect,
}

/// The TLS parameters of a connection string, read out of it.
struct Read {
    /// The connection string, as tokio-postgres can read it.
    conninfo: String,
    /// `sslmode`, as given.
    mode: Option<String>,
    /// `sslrootcert`, decoded.
    root: Option<String>,
}

/// Reads `conninfo` (a URL, or libpq's `key=value` form), its `sslmode` and `sslrootcert` as
/// libpq would, and builds the connector. The error is a sentence for the user, without the
/// connection string.
pub(crate) fn configure(conninfo: &str) -> Result<Tls, String> {
    let is_url = conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://");
    let Read { conninfo, mode, root } = if is_url {
        from_url(conninfo)?
    } else {
        from_key_values(conninfo)?;
        Read { conninfo: conninfo.to_owned(), mode: None, root: None }
    };
    let mut config: tokio_postgres::Config = conninfo.parse().map_err(|e: tokio_postgres::Error| {
        format!("not a PostgreSQL connection string: {}", super::postgres::clean(&e))
    })?;
    if only_sockets(&config) {
        // libpq ignores `sslmode` on a Unix socket (the server never offers TLS there);
        // tokio-postgres would ask, and fail `require` when the server says no.
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    }
    // `verify-ca` checks the chain to `sslrootcert`; `verify-full` the name too; `prefer` and
    // `require` check the chain when given roots (as libpq), nothing otherwise.
    let names = match (mode.as_deref(), &root) {
        (Some(mode @ ("verify-full" | "verify-ca")), None) => {
            return Err(format!(
                "sslmode={mode} needs the roots to check the server against: add sslrootcert=<a PEM file> or sslrootcert=system"
            ));
        }
        (mode, _) => mode == Some("verify-full"),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = match root {
        Some(root) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&root)?), provider.clone())
                .build()
                .map_err(|e| format!("the roots of sslrootcert cannot check a server: {e}"))?,
        ),
        None => None,
    };
    let verifier = Arc::new(Verifier { provider: provider.clone(), chain, names });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Tls { config, connector: MakeRustlsConnect::new(tls) })
}

/// The URL without `sslrootcert`, `verify-*` spelled `require`; the `sslmode` and
/// `sslrootcert` it had. Only the query is rewritten: the rest stays as the user wrote it
/// (several hosts, a socket directory, percent-escapes).
fn from_url(url: &str) -> Result<Read, String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => return Ok(Read { conninfo: url.to_owned(), mode: None, root: None }),
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
    Ok(Read { conninfo: out, mode, root })
}

/// Whether every host of `config` is a Unix socket (a directory).
fn only_sockets(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty() && hosts.iter().all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
}

/// A URL query value with its `%XX` escapes decoded, as libpq does: `+` stays a plus, and a
/// bad escape is refused (the `percent-encoding` crate would pass it through).
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

/// Checks the server's certificate against `chain`'s roots, when there are any (and its name
/// when `names`), and always that the server holds its key (the handshake's signatures):
/// without roots the connection is encrypted, not authenticated (libpq's `prefer` and
/// `require`).
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    /// `sslrootcert`'s roots.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// The certificate must name the host (`verify-full`).
    names: bool,
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
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // Not `verify-full`: webpki checks the chain first, so a name error means it held.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
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
        let Read { conninfo: url, mode, root } = from_url(
            "postgres://ci:pw@h1:5432,h2:5433/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(url, "postgres://ci:pw@h1:5432,h2:5433/db?sslmode=require&application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));

        let Read { conninfo: url, mode, root } = from_url("postgresql://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!((url.as_str(), mode, root), ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", None, None));

        let Read { conninfo: url, mode, .. } = from_url("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!((url.as_str(), mode.as_deref()), ("postgres://h/db?sslmode=disable", Some("disable")));

        let Read { conninfo: url, root, .. } = from_url("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!((url.as_str(), root.as_deref()), ("postgres://h/db", Some("system")));

        let root = from_url("postgres://h/db?sslrootcert=/a+b%20c.pem#frag").unwrap().root;
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
            assert_eq!(tls.config, conninfo.parse::<tokio_postgres::Config>().unwrap(), "{conninfo}");
        }
    }

    #[test]
    fn sslmode_does_not_apply_to_unix_sockets_as_with_libpq() {
        use tokio_postgres::config::SslMode;
        let mode = |conninfo: &str| configure(conninfo).unwrap().config.get_ssl_mode();
        assert_eq!(mode("postgres://ci@%2Fvar%2Frun%2Fpostgresql/db?sslmode=require"), SslMode::Disable);
        assert_eq!(mode("host=/run/a,/run/b sslmode=require"), SslMode::Disable);
        assert_eq!(
            mode("postgres://ci@%2Frun%2Fpg,db.internal/db?sslmode=require"),
            SslMode::Require,
            "a TCP host too"
        );
        assert_eq!(mode("postgres://ci@db.internal/db?sslmode=verify-full&sslrootcert=system"), SslMode::Require);
        assert_eq!(mode("dbname=x"), SslMode::Prefer, "no host at all: tokio-postgres's default, not ours");
    }
}
