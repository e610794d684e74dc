//! The cluster's certificates: a CA, the API server's serving certificate, the admin client
//! certificate (CN=admin, O=system:masters) and the one the API server shows kubelets
//! (CN=kube-apiserver-kubelet-client), all under `<data-dir>/tls/`.
//!
//! The CA and admin identity are made once and kept; the serving certificate is made anew at
//! every start so that its names always match the addresses the server listens on.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

pub struct Pki {
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    /// What the API server presents to kubelets (CN=kube-apiserver-kubelet-client).
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
    pub serving: rustls::ServerConfig,
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "rkube-ca");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Load or create the CA; returns its PEM and an issuer for signing.
fn load_or_create_ca(dir: &Path) -> Result<(String, Issuer<'static, KeyPair>)> {
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        let pem = fs::read_to_string(&cert_path)?;
        let key = KeyPair::from_pem(&fs::read_to_string(&key_path)?)?;
        let issuer = Issuer::from_ca_cert_pem(&pem, key).context("parsing the cluster CA")?;
        return Ok((pem, issuer));
    }
    let key = KeyPair::generate()?;
    let params = ca_params()?;
    let cert = params.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    fs::write(&cert_path, cert.pem())?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    p.subject_alt_names = sans;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Make sure every certificate exists and build the serving TLS configuration.
pub fn ensure(data_dir: &Path, addresses: &[IpAddr], names: &[String]) -> Result<Pki> {
    let dir: PathBuf = data_dir.join("tls");
    fs::create_dir_all(&dir)?;
    let (ca_pem, issuer) = load_or_create_ca(&dir)?;

    let client = |name: &str, cn: &str| -> Result<(PathBuf, PathBuf)> {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        if !cert.exists() || !key.exists() {
            let (c, k) = leaf(
                &issuer,
                cn,
                Some("system:masters"),
                vec![],
                ExtendedKeyUsagePurpose::ClientAuth,
            )?;
            write_private(&key, &k)?;
            fs::write(&cert, c)?;
        }
        Ok((cert, key))
    };
    let (admin_cert, admin_key) = client("admin", "admin")?;
    let (kubelet_cert, kubelet_key) = client("kubelet-client", "kube-apiserver-kubelet-client")?;

    let mut sans: Vec<SanType> = addresses.iter().map(|a| SanType::IpAddress(*a)).collect();
    for n in names {
        sans.push(SanType::DnsName(n.as_str().try_into()?));
    }
    let (serving_cert, serving_key) = leaf(
        &issuer,
        "kube-apiserver",
        None,
        sans,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    write_private(&dir.join("serving.key"), &serving_key)?;
    fs::write(dir.join("serving.crt"), &serving_cert)?;

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(serving_cert.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(serving_key.as_bytes())?;
    let serving = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Pki {
        ca_pem,
        admin_cert_pem: fs::read_to_string(&admin_cert)?,
        admin_key_pem: fs::read_to_string(&admin_key)?,
        kubelet_client_cert_pem: fs::read_to_string(&kubelet_cert)?,
        kubelet_client_key_pem: fs::read_to_string(&kubelet_key)?,
        serving,
    })
}
