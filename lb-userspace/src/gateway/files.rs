//! Loading the files a gateway names (TLS certificate and key, API key files, JWKS documents)
//! at `xlb check`, agent start and every reload, so that a bad file is refused with the line of
//! the key that names it (`xlb.toml:LINE: KEY: FILE: what`) before anything changes.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::l7::{FileRef, Tls};
use crate::gateway::auth::{ApiKeys, JwtPolicy, JwtVerifier};

/// ALPN protocol ids, in the server's order of preference.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Reads a whole file, naming the file and the reason on failure.
fn read(file: &FileRef) -> Result<String, String> {
    std::fs::read_to_string(&file.path)
        .map_err(|e| file.error(format_args!("{}: {e}", file.path.display())))
}

/// The rustls configuration of a TLS listener from its PEM files: ring as the provider (as
/// everywhere in xlb), TLS 1.2 and 1.3, ALPN `h2` (when `http2`) and `http/1.1`. Every problem
/// is returned, each attributed to the key naming the file at fault.
pub fn load_tls(tls: &Tls, http2: bool) -> Result<Arc<ServerConfig>, Vec<String>> {
    let mut errors = Vec::new();
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_file_iter(&tls.cert_file.path) {
            Ok(iter) => match iter.collect::<Result<Vec<_>, _>>() {
                Ok(chain) if chain.is_empty() => {
                    errors.push(tls.cert_file.error(format_args!(
                        "{}: no CERTIFICATE block in the PEM file",
                        tls.cert_file.path.display()
                    )));
                    Vec::new()
                }
                Ok(chain) => chain,
                Err(e) => {
                    errors.push(pem_error(&tls.cert_file, &e));
                    Vec::new()
                }
            },
            Err(e) => {
                errors.push(pem_error(&tls.cert_file, &e));
                Vec::new()
            }
        };
    let key = match PrivateKeyDer::from_pem_file(&tls.key_file.path) {
        Ok(key) => Some(key),
        Err(e) => {
            errors.push(pem_error(&tls.key_file, &e));
            None
        }
    };
    let (Some(key), true) = (key, errors.is_empty()) else {
        return Err(errors);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![tls.cert_file.error(e)])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            vec![tls.key_file.error(format_args!(
                "{} does not fit {}: {e}",
                tls.key_file.path.display(),
                tls.cert_file.path.display()
            ))]
        })?;
    config.alpn_protocols = if http2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
    } else {
        vec![ALPN_HTTP11.to_vec()]
    };
    Ok(Arc::new(config))
}

fn pem_error(file: &FileRef, e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let what = match e {
        Error::NoItemsFound => {
            "no PEM block of the expected kind (certificate or private key)".to_owned()
        }
        Error::Io(io) => io.to_string(),
        other => format!("not a valid PEM file: {other}"),
    };
    file.error(format_args!("{}: {what}", file.path.display()))
}

/// An API key file (`name sha256:<hex>` lines), with the file's own line on errors.
pub fn load_api_keys(file: &FileRef) -> Result<ApiKeys, String> {
    let text = read(file)?;
    ApiKeys::parse(&text).map_err(|e| file.error(format_args!("{}:{e}", file.path.display())))
}

/// A JWKS document and the route's issuer and audience requirements.
pub fn load_jwks(
    file: &FileRef,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<JwtVerifier, String> {
    let text = read(file)?;
    let policy = JwtPolicy {
        issuers: issuer.map(str::to_owned).into_iter().collect(),
        audiences: audience.map(str::to_owned).into_iter().collect(),
    };
    JwtVerifier::from_jwks(&text, policy)
        .map_err(|e| file.error(format_args!("{}: {e}", file.path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file_ref(path: PathBuf, key: &str) -> FileRef {
        FileRef {
            path,
            config_file: "xlb.toml".into(),
            line: 7,
            key: key.into(),
        }
    }

    #[test]
    fn errors_name_the_config_line_key_and_file() {
        let dir = std::env::temp_dir().join(format!("xlb-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys.txt");
        std::fs::write(&keys, "ok sha256:00\n").unwrap();
        let err =
            load_api_keys(&file_ref(keys.clone(), "vip[0].route[1].api_key_file")).unwrap_err();
        assert!(
            err.starts_with("xlb.toml:7: vip[0].route[1].api_key_file: ")
                && err.contains("keys.txt:line 1:"),
            "{err}"
        );
        let missing = dir.join("missing.pem");
        let tls = Tls {
            cert_file: file_ref(missing.clone(), "vip[0].gateway.tls.cert_file"),
            key_file: file_ref(keys, "vip[0].gateway.tls.key_file"),
        };
        let errs = load_tls(&tls, true).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("xlb.toml:7: vip[0].gateway.tls.cert_file: "));
        assert!(errs[1].starts_with("xlb.toml:7: vip[0].gateway.tls.key_file: "));
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, "{\"keys\": []}").unwrap();
        let err = load_jwks(&file_ref(jwks, "vip[0].route[0].jwks_file"), None, None).unwrap_err();
        assert!(err.contains("empty"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
