//! Per-route authentication for the gateway: API keys stored hashed in a key file, and JWTs
//! (HS256, RS256, ES256) verified against a JWKS document. Each returns the caller's identity
//! (the key's name, the token's `sub`), which rate limits and the identity header use.
//!
//! Status codes, decided here once so every route answers alike:
//! - [`AuthError::Missing`]: no credential at all -> 401 with `WWW-Authenticate: Bearer
//!   realm="xlb"` (RFC 6750 §3.1: no error code when the request carried no credential).
//! - [`AuthError::Invalid`]: a JWT that cannot be trusted (malformed, bad signature, unknown `kid`,
//!   wrong algorithm, expired, not yet valid) -> 401 with `error="invalid_token"` (RFC 6750
//!   §3.1), so a client knows to fetch a new token.
//! - [`AuthError::Refused`]: a credential that is well formed but not accepted here (an API key not
//!   in the file, a genuine JWT issued by another issuer or for another audience) -> 403, as the
//!   issue asks: presenting it again will not help.

use std::collections::HashMap;
use std::fmt;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ring::digest;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

/// The realm named in every challenge, so clients can tell xlb's challenge from an upstream's.
pub const REALM: &str = "xlb";

/// Clock skew tolerated on `exp` and `nbf`, in seconds: enough for hosts kept by NTP, short
/// enough that an expired token is not useful for long.
pub const JWT_LEEWAY_SECS: u64 = 30;

/// Why a request was not authenticated; the variant decides the status code (see the module
/// documentation), the reason is for the access log only and is never sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request carried no credential for this route.
    #[error("no credential presented")]
    Missing,
    /// The credential could not be verified (401, `invalid_token`).
    #[error("invalid credential: {0}")]
    Invalid(String),
    /// The credential is well formed but not accepted for this route (403).
    #[error("credential refused: {0}")]
    Refused(String),
}

impl AuthError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => 401,
            AuthError::Refused(_) => 403,
        }
    }

    /// The `WWW-Authenticate` value for a 401 (RFC 6750 §3); `None` for a 403, where a new
    /// challenge would only invite the client to retry the same credential.
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            AuthError::Missing => Some(format!("Bearer realm=\"{REALM}\"")),
            AuthError::Invalid(_) => {
                Some(format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""))
            }
            AuthError::Refused(_) => None,
        }
    }
}

/// A line of an API key file that could not be used; the line number (from 1) lets an operator
/// fix the file without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct KeyFileError {
    /// The 1-based line number in the file.
    pub line: usize,
    /// What is wrong with it.
    pub kind: KeyFileErrorKind,
}

/// What is wrong with a key file line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileErrorKind {
    /// Each line is `<name> sha256:<hex>`.
    #[error("expected `<name> sha256:<64 hex digits>`")]
    Shape,
    /// Names travel upstream in a header and into logs, so they are kept to a safe alphabet.
    #[error("key name {0:?} must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    /// Only SHA-256 is supported; the prefix leaves room for a slower hash later.
    #[error("unsupported hash {0:?}; only sha256: is supported")]
    Algorithm(String),
    /// The digest must be 32 bytes of hex.
    #[error("digest must be 64 hex digits")]
    Digest,
    /// Two keys with one name would make the identity ambiguous.
    #[error("key name {name:?} already used on line {first}")]
    DuplicateName {
        /// The repeated name.
        name: String,
        /// Where it was first defined.
        first: usize,
    },
    /// The same key under two names would make the identity depend on file order.
    #[error("the same key digest is already on line {0}")]
    DuplicateDigest(usize),
}

/// The API keys a route accepts, as SHA-256 digests: the file never holds a usable key, and
/// lookup hashes the presented key and compares it with every digest in constant time.
#[derive(Clone, Default)]
pub struct ApiKeys {
    entries: Vec<(String, [u8; 32])>,
}

impl fmt::Debug for ApiKeys {
    // Digests are not secrets, but there is no reason to put them in logs either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("names", &self.names().collect::<Vec<_>>())
            .finish()
    }
}

impl ApiKeys {
    /// Parse a key file: one `<name> sha256:<hex of SHA-256(key)>` per line; blank lines and
    /// anything from `#` to the end of a line are ignored.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        let mut lines_of: HashMap<String, usize> = HashMap::new();
        let mut digest_lines: HashMap<[u8; 32], usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |kind| KeyFileError { line, kind };
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let mut fields = content.split_whitespace();
            let (Some(name), Some(hash), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(err(KeyFileErrorKind::Shape));
            };
            if !valid_name(name) {
                return Err(err(KeyFileErrorKind::Name(name.to_string())));
            }
            let Some((algorithm, hex)) = hash.split_once(':') else {
                return Err(err(KeyFileErrorKind::Shape));
            };
            if !algorithm.eq_ignore_ascii_case("sha256") {
                return Err(err(KeyFileErrorKind::Algorithm(algorithm.to_string())));
            }
            let digest = parse_hex32(hex).ok_or_else(|| err(KeyFileErrorKind::Digest))?;
            if let Some(&first) = lines_of.get(name) {
                return Err(err(KeyFileErrorKind::DuplicateName {
                    name: name.to_string(),
                    first,
                }));
            }
            if let Some(&first) = digest_lines.get(&digest) {
                return Err(err(KeyFileErrorKind::DuplicateDigest(first)));
            }
            lines_of.insert(name.to_string(), line);
            digest_lines.insert(digest, line);
            entries.push((name.to_string(), digest));
        }
        Ok(Self { entries })
    }

    /// The line an operator puts in the key file for `name` and `key` (for an `xlb` subcommand
    /// that generates keys, and for tests).
    pub fn file_line(name: &str, key: &str) -> String {
        let digest = sha256(key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{name} sha256:{hex}")
    }

    /// The names of the stored keys, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(name, _)| name.as_str())
    }

    /// The identity (key name) for a presented key. `None` (no header or query parameter) is
    /// [`AuthError::Missing`]; an empty or unknown key is [`AuthError::Refused`].
    pub fn verify(&self, presented: Option<&str>) -> Result<&str, AuthError> {
        let presented = presented.ok_or(AuthError::Missing)?;
        let digest = sha256(presented.as_bytes());
        match find_constant_time(self.entries.iter().map(|(_, d)| d), &digest) {
            Some(index) if !presented.is_empty() => Ok(&self.entries[index].0),
            _ => Err(AuthError::Refused("unknown API key".into())),
        }
    }
}

/// The index of `digest` among `stored`, comparing against every entry with
/// [`ConstantTimeEq`] and selecting the index without branching, so the time taken does not
/// depend on how many bytes of the digest match or where in the file the key is.
fn find_constant_time<'a>(
    stored: impl Iterator<Item = &'a [u8; 32]>,
    digest: &[u8; 32],
) -> Option<usize> {
    let mut found = Choice::from(0);
    let mut index = 0u64;
    for (i, candidate) in stored.enumerate() {
        let equal = candidate.ct_eq(digest);
        index.conditional_assign(&(i as u64), equal);
        found |= equal;
    }
    bool::from(found).then_some(index as usize)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Why a JWKS document could not be used; refused when the configuration loads, so a route never
/// runs with a key set it cannot use.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The document is not a JWKS (`{"keys": [...]}` of RSA, EC or oct keys).
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    /// A key is of a type or algorithm the gateway does not verify.
    #[error("key {index} (kid {kid:?}): {reason}")]
    Unsupported {
        /// The key's position in `keys`.
        index: usize,
        /// Its `kid`, if any.
        kid: Option<String>,
        /// What is unsupported.
        reason: String,
    },
    /// With more than one key, tokens pick theirs by `kid`, so every key needs one.
    #[error("key {0} has no kid, but the set has more than one key")]
    MissingKid(usize),
    /// An empty set would refuse every token; leave auth off or fix the file instead.
    #[error("the key set is empty")]
    Empty,
}

/// What a JWT route requires of a token besides a valid signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtPolicy {
    /// Accepted `iss` values; a token must carry one of them.
    pub issuers: Vec<String>,
    /// Accepted audiences; the token's `aud` (string or array) must contain one of them.
    pub audiences: Vec<String>,
}

/// A verifying key with the one algorithm it may be used with: the algorithm comes from the key
/// (its `alg`, or its type), never from the token, which is what defeats `alg: none` and
/// HS256-with-a-public-key confusion.
struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies a route's JWTs against a JWKS document and a [`JwtPolicy`].
pub struct JwtVerifier {
    keys: Vec<VerifyingKey>,
    policy: JwtPolicy,
}

impl fmt::Debug for JwtVerifier {
    // The key set may hold HMAC secrets; show only what identifies the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.algorithm))
            .collect();
        f.debug_struct("JwtVerifier")
            .field("keys", &keys)
            .field("policy", &self.policy)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
}

impl JwtVerifier {
    /// Build a verifier from a JWKS JSON document (`{"keys": [...]}`): RSA keys verify RS256, P-256
    /// EC keys ES256, `oct` keys (base64url secret in `k`) HS256. A key's `alg`, when present,
    /// must be one of these and match its type.
    pub fn from_jwks(json: &str, policy: JwtPolicy) -> Result<Self, JwksError> {
        let set: JwkSet = serde_json::from_str(json)?;
        if set.keys.is_empty() {
            return Err(JwksError::Empty);
        }
        let many = set.keys.len() > 1;
        let keys = set
            .keys
            .iter()
            .enumerate()
            .map(|(index, jwk)| {
                let kid = jwk.common.key_id.clone();
                if many && kid.is_none() {
                    return Err(JwksError::MissingKid(index));
                }
                let unsupported = |reason: String| JwksError::Unsupported {
                    index,
                    kid: kid.clone(),
                    reason,
                };
                let algorithm = key_algorithm(jwk).map_err(unsupported)?;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| unsupported(e.to_string()))?;
                Ok(VerifyingKey {
                    kid,
                    algorithm,
                    key,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys, policy })
    }

    /// Verify a bearer token (the `Authorization: Bearer` value, without the scheme) and return
    /// its `sub`. `None` is [`AuthError::Missing`].
    pub fn verify(&self, token: Option<&str>) -> Result<String, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let invalid = |e: &dyn fmt::Display| AuthError::Invalid(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| AuthError::Invalid(format!("no key for kid {:?}", header.kid)))?;

        let mut validation = Validation::new(key.algorithm);
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // An empty list means "not checked" (`jwt_issuer` / `jwt_audience` left out): handing
        // jsonwebtoken an empty set would instead refuse every token that carries the claim.
        let mut required = vec!["exp", "sub"];
        if !self.policy.issuers.is_empty() {
            validation.set_issuer(&self.policy.issuers);
            required.push("iss");
        }
        if self.policy.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.validate_aud = true;
            validation.set_audience(&self.policy.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                    AuthError::Refused(e.to_string())
                }
                _ => invalid(&e),
            }
        })?;
        match data.claims.sub {
            Some(sub) if !sub.is_empty() => Ok(sub),
            _ => Err(AuthError::Invalid("empty sub".into())),
        }
    }
}

/// The one algorithm a JWK may verify.
fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::EllipticCurve(p) => {
            return Err(format!("curve {:?} is not supported (P-256 only)", p.curve));
        }
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        AlgorithmParameters::OctetKeyPair(_) => {
            return Err("OKP keys (EdDSA) are not supported".into());
        }
    };
    match jwk.common.key_algorithm {
        None => Ok(by_type),
        Some(KeyAlgorithm::RS256) if by_type == Algorithm::RS256 => Ok(by_type),
        Some(KeyAlgorithm::ES256) if by_type == Algorithm::ES256 => Ok(by_type),
        Some(KeyAlgorithm::HS256) if by_type == Algorithm::HS256 => Ok(by_type),
        Some(other) => Err(format!(
            "alg {other} is not supported for a {by_type:?} key"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    #[test]
    fn key_file_accepts_comments_and_blank_lines() {
        let text = format!(
            "# keys for the orders API\n\n{}\n  {}   # rotated 2026-11\n",
            ApiKeys::file_line("billing", "k-billing-secret"),
            ApiKeys::file_line("ci.bot_2", "another"),
        );
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["billing", "ci.bot_2"]);
        assert!(ApiKeys::parse("").unwrap().names().next().is_none());
    }

    #[test]
    fn key_file_errors_name_the_line() {
        let good = ApiKeys::file_line("a", "x");
        let digest = good.split_once(' ').unwrap().1.to_string();
        let cases: Vec<(String, usize, KeyFileErrorKind)> = vec![
            (format!("{good}\nlonely\n"), 2, KeyFileErrorKind::Shape),
            (format!("# c\n{good} extra\n"), 2, KeyFileErrorKind::Shape),
            (
                format!("b {}\n", "f".repeat(64)),
                1,
                KeyFileErrorKind::Shape,
            ),
            (
                format!("bad/name {digest}"),
                1,
                KeyFileErrorKind::Name("bad/name".into()),
            ),
            (
                "b md5:00".to_string(),
                1,
                KeyFileErrorKind::Algorithm("md5".into()),
            ),
            ("b sha256:abc".to_string(), 1, KeyFileErrorKind::Digest),
            (
                format!("b sha256:{}", "g".repeat(64)),
                1,
                KeyFileErrorKind::Digest,
            ),
            (
                format!("{good}\n\n{}", ApiKeys::file_line("a", "y")),
                3,
                KeyFileErrorKind::DuplicateName {
                    name: "a".into(),
                    first: 1,
                },
            ),
            (
                format!("{good}\nb {digest}"),
                2,
                KeyFileErrorKind::DuplicateDigest(1),
            ),
        ];
        for (text, line, kind) in cases {
            let err = ApiKeys::parse(&text).unwrap_err();
            assert_eq!(err, KeyFileError { line, kind }, "for {text:?}");
            assert!(err.to_string().starts_with(&format!("line {line}: ")));
        }
    }

    #[test]
    fn api_key_lookup() {
        let text = [
            ("one", "secret-1"),
            ("two", "secret-2"),
            ("three", "secret-3"),
        ]
        .map(|(n, k)| ApiKeys::file_line(n, k))
        .join("\n");
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(keys.verify(Some("secret-1")), Ok("one"));
        assert_eq!(keys.verify(Some("secret-3")), Ok("three"));
        assert_eq!(keys.verify(None), Err(AuthError::Missing));
        for wrong in ["secret-4", "secret-", "", "SECRET-1", "secret-1 "] {
            let err = keys.verify(Some(wrong)).unwrap_err();
            assert_eq!(err.status(), 403, "{wrong:?}");
            assert_eq!(err.www_authenticate(), None);
        }
        // The file holds digests only: presenting a digest is not presenting the key.
        let digest_hex = text.lines().next().unwrap().split_once(':').unwrap().1;
        assert!(keys.verify(Some(digest_hex)).is_err());
    }

    #[test]
    fn constant_time_search_checks_every_entry_and_selects_the_match() {
        let digests: Vec<[u8; 32]> = (0u8..5).map(|i| [i; 32]).collect();
        for (i, d) in digests.iter().enumerate() {
            assert_eq!(find_constant_time(digests.iter(), d), Some(i));
        }
        // Differs only in the last byte: no match.
        let mut near = [4u8; 32];
        near[31] = 5;
        assert_eq!(find_constant_time(digests.iter(), &near), None);
        assert_eq!(find_constant_time(std::iter::empty(), &near), None);
        // The search visits every entry even after a match (no early exit).
        let visited = std::cell::Cell::new(0);
        let counted = digests.iter().inspect(|_| visited.set(visited.get() + 1));
        assert_eq!(find_constant_time(counted, &[0; 32]), Some(0));
        assert_eq!(visited.get(), digests.len());
    }

    #[test]
    fn status_and_challenges() {
        assert_eq!(AuthError::Missing.status(), 401);
        assert_eq!(
            AuthError::Missing.www_authenticate().unwrap(),
            r#"Bearer realm="xlb""#
        );
        let invalid = AuthError::Invalid("expired".into());
        assert_eq!(invalid.status(), 401);
        assert_eq!(
            invalid.www_authenticate().unwrap(),
            r#"Bearer realm="xlb", error="invalid_token""#
        );
        assert_eq!(AuthError::Refused("aud".into()).status(), 403);
    }

    // ---- JWT ----

    fn b64url(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    const HMAC_SECRET: &[u8] = b"a test secret of thirty-two bytes";
    const RSA_DER: &[u8] = include_bytes!("testdata/rsa2048-test-only.der");
    const RSA_N: &str = include_str!("testdata/rsa2048-test-only.n");

    struct Keys {
        jwks: String,
        es: EncodingKey,
    }

    fn keys() -> Keys {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        assert_eq!((point.len(), point[0]), (65, 4), "uncompressed P-256 point");
        let jwks = json!({ "keys": [
            { "kty": "oct", "kid": "hs", "alg": "HS256", "k": b64url(HMAC_SECRET) },
            { "kty": "RSA", "kid": "rs", "use": "sig", "n": RSA_N.trim(), "e": "AQAB" },
            { "kty": "EC", "kid": "es", "crv": "P-256",
              "x": b64url(&point[1..33]), "y": b64url(&point[33..]) },
        ]});
        Keys {
            jwks: jwks.to_string(),
            es: EncodingKey::from_ec_der(pkcs8.as_ref()),
        }
    }

    fn policy() -> JwtPolicy {
        JwtPolicy {
            issuers: vec!["https://idp.example".into()],
            audiences: vec!["orders".into(), "billing".into()],
        }
    }

    fn claims(patch: serde_json::Value) -> serde_json::Value {
        let now = get_current_timestamp();
        let mut c = json!({
            "iss": "https://idp.example", "aud": "orders", "sub": "alice",
            "iat": now, "nbf": now - 10, "exp": now + 300,
        });
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &serde_json::Value, keys: &Keys) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        let key = match alg {
            Algorithm::HS256 => EncodingKey::from_secret(HMAC_SECRET),
            Algorithm::RS256 => EncodingKey::from_rsa_der(RSA_DER),
            Algorithm::ES256 => keys.es.clone(),
            other => panic!("{other:?}"),
        };
        encode(&header, claims, &key).unwrap()
    }

    #[test]
    fn accepts_each_algorithm_and_returns_sub() {
        let keys = keys();
        let v = JwtVerifier::from_jwks(&keys.jwks, policy()).unwrap();
        for (alg, kid) in [
            (Algorithm::HS256, "hs"),
            (Algorithm::RS256, "rs"),
            (Algorithm::ES256, "es"),
        ] {
            let token = sign(alg, Some(kid), &claims(json!({})), &keys);
            assert_eq!(v.verify(Some(&token)), Ok("alice".to_string()), "{alg:?}");
        }
        // aud as an array, one member accepted; within the leeway after exp.
        let now = get_current_timestamp();
        let c = claims(json!({ "aud": ["other", "billing"], "exp": now - 5 }));
        assert_eq!(
            v.verify(Some(&sign(Algorithm::ES256, Some("es"), &c, &keys))),
            Ok("alice".into())
        );
        assert_eq!(v.verify(None), Err(AuthError::Missing));
    }

    fn refused_with(v: &JwtVerifier, token: &str) -> AuthError {
        v.verify(Some(token)).expect_err("token must be refused")
    }

    #[test]
    fn refuses_bad_tokens() {
        let keys = keys();
        let v = JwtVerifier::from_jwks(&keys.jwks, policy()).unwrap();
        let now = get_current_timestamp();
        let lw = JWT_LEEWAY_SECS;
        let rs = |c: serde_json::Value| sign(Algorithm::RS256, Some("rs"), &claims(c), &keys);

        // 401 invalid_token: cannot be trusted or no longer valid.
        let invalid = [
            ("expired", rs(json!({ "exp": now - lw - 5 }))),
            ("not yet valid", rs(json!({ "nbf": now + lw + 60 }))),
            ("no exp", rs(json!({ "exp": null }))),
            ("no sub", rs(json!({ "sub": null }))),
            ("empty sub", rs(json!({ "sub": "" }))),
            (
                "unknown kid",
                sign(Algorithm::RS256, Some("nope"), &claims(json!({})), &keys),
            ),
            (
                "no kid, many keys",
                sign(Algorithm::RS256, None, &claims(json!({})), &keys),
            ),
            // Signed with the right algorithm but presented under another key's kid.
            (
                "wrong key",
                sign(Algorithm::ES256, Some("rs"), &claims(json!({})), &keys),
            ),
            ("garbage", "not.a.jwt".to_string()),
            ("empty", String::new()),
        ];
        for (what, token) in invalid {
            let err = refused_with(&v, &token);
            assert!(matches!(err, AuthError::Invalid(_)), "{what}: {err:?}");
        }

        // 403: genuine tokens meant for someone else.
        for (what, token) in [
            ("wrong iss", rs(json!({ "iss": "https://evil.example" }))),
            ("wrong aud", rs(json!({ "aud": "payroll" }))),
            (
                "aud array without ours",
                rs(json!({ "aud": ["payroll", "hr"] })),
            ),
        ] {
            let err = refused_with(&v, &token);
            assert_eq!(err.status(), 403, "{what}: {err:?}");
        }
        // Missing iss or aud is not "another issuer": the token is incomplete.
        for c in [json!({ "iss": null }), json!({ "aud": null })] {
            assert!(matches!(refused_with(&v, &rs(c)), AuthError::Invalid(_)));
        }

        // A tampered payload breaks the signature.
        let token = rs(json!({}));
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[1] = b64url(claims(json!({ "sub": "admin" })).to_string().as_bytes());
        assert!(matches!(
            refused_with(&v, &parts.join(".")),
            AuthError::Invalid(_)
        ));
    }

    #[test]
    fn an_empty_issuer_or_audience_list_is_not_checked() {
        // `jwt_issuer` / `jwt_audience` left out of the route: any iss and aud are accepted,
        // and a token without them too; exp and sub are still required.
        let keys = keys();
        let open = JwtPolicy {
            issuers: Vec::new(),
            audiences: Vec::new(),
        };
        let v = JwtVerifier::from_jwks(&keys.jwks, open).unwrap();
        let rs = |c: serde_json::Value| sign(Algorithm::RS256, Some("rs"), &claims(c), &keys);
        for c in [
            json!({}),
            json!({ "iss": "https://other.example", "aud": "payroll" }),
            json!({ "iss": null, "aud": null }),
        ] {
            assert_eq!(v.verify(Some(&rs(c))).unwrap(), "alice");
        }
        assert!(matches!(
            refused_with(&v, &rs(json!({ "exp": null }))),
            AuthError::Invalid(_)
        ));
    }

    #[test]
    fn refuses_alg_none_and_alg_confusion() {
        let keys = keys();
        let v = JwtVerifier::from_jwks(&keys.jwks, policy()).unwrap();
        let payload = b64url(claims(json!({})).to_string().as_bytes());
        for header in [
            json!({ "alg": "none", "kid": "rs" }),
            json!({ "alg": "none" }),
            json!({ "alg": "None", "kid": "hs" }),
        ] {
            let token = format!("{}.{payload}.", b64url(header.to_string().as_bytes()));
            assert!(
                matches!(refused_with(&v, &token), AuthError::Invalid(_)),
                "{header}"
            );
        }
        // The classic confusion: HS256 with the RSA public key's bytes as the HMAC secret,
        // naming the RSA key. The key fixes the algorithm (RS256), so HS256 is refused.
        let public_n = RSA_N.trim().as_bytes();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rs".into());
        let token = encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(public_n),
        )
        .unwrap();
        assert!(matches!(refused_with(&v, &token), AuthError::Invalid(_)));
        // An HS256 token under the EC key's kid, and an RS256 token under the oct key's kid.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("es".into());
        let token = encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(HMAC_SECRET),
        )
        .unwrap();
        assert!(matches!(refused_with(&v, &token), AuthError::Invalid(_)));
        let token = sign(Algorithm::RS256, Some("hs"), &claims(json!({})), &keys);
        assert!(matches!(refused_with(&v, &token), AuthError::Invalid(_)));
    }

    #[test]
    fn single_key_set_needs_no_kid() {
        let jwks = json!({ "keys": [{ "kty": "oct", "k": b64url(HMAC_SECRET) }] }).to_string();
        let v = JwtVerifier::from_jwks(&jwks, policy()).unwrap();
        let keys = keys();
        assert_eq!(
            v.verify(Some(&sign(
                Algorithm::HS256,
                None,
                &claims(json!({})),
                &keys
            ))),
            Ok("alice".into())
        );
    }

    #[test]
    fn jwks_errors() {
        let p = policy;
        assert!(matches!(
            JwtVerifier::from_jwks("{}", p()),
            Err(JwksError::Json(_))
        ));
        assert!(matches!(
            JwtVerifier::from_jwks(r#"{"keys":[]}"#, p()),
            Err(JwksError::Empty)
        ));
        let two_no_kid = json!({ "keys": [
            { "kty": "oct", "kid": "a", "k": "AAAA" }, { "kty": "oct", "k": "AAAA" } ]});
        assert!(matches!(
            JwtVerifier::from_jwks(&two_no_kid.to_string(), p()),
            Err(JwksError::MissingKid(1))
        ));
        for key in [
            json!({ "kty": "oct", "alg": "HS512", "k": "AAAA" }),
            json!({ "kty": "oct", "alg": "RS256", "k": "AAAA" }),
            json!({ "kty": "RSA", "alg": "PS256", "n": RSA_N.trim(), "e": "AQAB" }),
            json!({ "kty": "EC", "crv": "P-384", "x": "AAAA", "y": "AAAA" }),
            json!({ "kty": "OKP", "crv": "Ed25519", "x": "AAAA" }),
        ] {
            let doc = json!({ "keys": [key] }).to_string();
            assert!(
                matches!(
                    JwtVerifier::from_jwks(&doc, p()),
                    Err(JwksError::Unsupported { index: 0, .. })
                ),
                "{doc}"
            );
        }
        // Debug never shows an HMAC secret.
        let v = JwtVerifier::from_jwks(&keys().jwks, p()).unwrap();
        assert!(!format!("{v:?}").contains(&b64url(HMAC_SECRET)));
    }
}
