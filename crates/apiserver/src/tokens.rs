//! Service account tokens: JWTs (ES256) that the `serviceaccounts/token` subresource issues and
//! the authentication stage accepts as `Authorization: Bearer` credentials.

use std::path::Path;

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{json, Value};

/// The issuer upstream uses by default, so that clients that check it are not surprised.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub struct TokenSigner {
    key: EcdsaKeyPair,
    public: Vec<u8>,
    rng: SystemRandom,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TokenSigner {
    /// Load the signing key from `path` (PKCS#8), creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> anyhow::Result<TokenSigner> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| {
                    anyhow::anyhow!("generating the service account signing key failed")
                })?;
                let mut f = std::fs::OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(doc.as_ref())?;
                f.sync_all()?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e.into()),
        };
        let key = EcdsaKeyPair::from_pkcs8(alg, &pkcs8, &rng)
            .map_err(|_| anyhow::anyhow!("{} is not a P-256 PKCS#8 key", path.display()))?;
        let public = key.public_key().as_ref().to_vec();
        Ok(TokenSigner { key, public, rng })
    }

    /// A signed token carrying `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, ring::error::Unspecified> {
        let header = b64(json!({"alg": "ES256", "typ": "JWT"}).to_string().as_bytes());
        let body = b64(claims.to_string().as_bytes());
        let input = format!("{header}.{body}");
        let sig = self.key.sign(&self.rng, input.as_bytes())?;
        Ok(format!("{input}.{}", b64(sig.as_ref())))
    }

    /// The claims of a token this signer issued and that has not expired at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Option<Value> {
        let mut parts = token.split('.');
        let (h, b, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()?,
        )
        .ok()?;
        if header["alg"] != "ES256" {
            return None;
        }
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(format!("{h}.{b}").as_bytes(), &sig)
            .ok()?;
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b)
                .ok()?,
        )
        .ok()?;
        if claims["iss"] != ISSUER
            || claims["exp"].as_i64()? <= now
            || claims["nbf"].as_i64().unwrap_or(0) > now
        {
            return None;
        }
        Some(claims)
    }
}

/// The claims of a token for a service account.
pub fn service_account_claims(
    namespace: &str,
    name: &str,
    uid: &str,
    audiences: &[String],
    now: i64,
    expires: i64,
) -> Value {
    json!({
        "iss": ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": audiences,
        "iat": now,
        "nbf": now,
        "exp": expires,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_when_genuine_and_fresh() {
        let dir = tempfile_dir();
        let signer = TokenSigner::load_or_create(&dir.join("sa.key")).unwrap();
        let claims =
            service_account_claims("default", "bot", "u1", &[ISSUER.to_string()], 1000, 5000);
        let token = signer.sign(&claims).unwrap();
        assert_eq!(
            signer.verify(&token, 2000).unwrap()["sub"],
            "system:serviceaccount:default:bot"
        );
        assert!(signer.verify(&token, 5000).is_none(), "expired");
        // The same key is loaded again; another key does not verify.
        let again = TokenSigner::load_or_create(&dir.join("sa.key")).unwrap();
        assert!(again.verify(&token, 2000).is_some());
        let other = TokenSigner::load_or_create(&dir.join("other.key")).unwrap();
        assert!(other.verify(&token, 2000).is_none());
        // Tampering breaks it.
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[1] = b64(
            service_account_claims("kube-system", "admin", "u1", &[], 1000, 5000)
                .to_string()
                .as_bytes(),
        );
        assert!(signer.verify(&parts.join("."), 2000).is_none());
        for junk in ["", "a.b", "a.b.c", "a.b.c.d"] {
            assert!(signer.verify(junk, 2000).is_none());
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rkube-tokens-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
