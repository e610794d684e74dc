//! The images rkube builds for itself, with no registry to pull from: the pod sandbox ("pause")
//! image and a busybox image for tests and first steps, both from Debian's `busybox-static`.
//!
//! Each is written as an OCI image-layout tarball (what `ctr images import` and `skopeo copy
//! oci-archive:` read): one uncompressed layer, a config, a manifest and an `index.json` naming
//! the image. Files carry fixed times and owners, so the same busybox gives the same digests.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

/// The sandbox image every pod's network namespace is held by.
pub const PAUSE_IMAGE: &str = "rkube.local/pause:1";
/// The busybox image, under the name `image: busybox` resolves to.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:latest";
/// Where Debian's `busybox-static` puts the binary.
pub const BUSYBOX_BINARY: &str = "/bin/busybox";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source} (install Debian's busybox-static)")]
    Busybox {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listing busybox applets: {0}")]
    Applets(String),
    #[error("writing the image: {0}")]
    Io(#[from] std::io::Error),
}

/// One file of a layer.
enum Entry {
    Dir(&'static str, u32),
    File(String, u32, Vec<u8>),
    Symlink(String, String),
}

fn sha256(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn header(path: &str, mode: u32, size: u64, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    // Paths here are short and ours; a failure would be an internal bug caught by the tests.
    let _ = h.set_path(path);
    h
}

fn layer(entries: &[Entry]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p, mode) => {
                let mut h = header(p, *mode, 0, tar::EntryType::Directory);
                h.set_cksum();
                b.append(&h, std::io::empty())?;
            }
            Entry::File(p, mode, data) => {
                let mut h = header(p, *mode, data.len() as u64, tar::EntryType::Regular);
                h.set_cksum();
                b.append(&h, data.as_slice())?;
            }
            Entry::Symlink(p, target) => {
                let mut h = header(p, 0o777, 0, tar::EntryType::Symlink);
                let _ = h.set_link_name(target);
                h.set_cksum();
                b.append(&h, std::io::empty())?;
            }
        }
    }
    b.into_inner()
}

/// An OCI image-layout tarball holding one image, `name`, made of one layer.
fn oci_archive(name: &str, layer: &[u8], config: Value) -> std::io::Result<Vec<u8>> {
    let layer_digest = format!("sha256:{}", sha256(layer));
    let mut config = config;
    config["architecture"] = json!("amd64");
    config["os"] = json!("linux");
    config["rootfs"] = json!({"type": "layers", "diff_ids": [layer_digest]});
    config["created"] = json!("1970-01-01T00:00:00Z");
    let config = serde_json::to_vec(&config)?;
    let config_digest = format!("sha256:{}", sha256(&config));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = format!("sha256:{}", sha256(&manifest));
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
        }],
    }))?;
    let mut out = tar::Builder::new(Vec::new());
    let mut put = |path: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = header(path, 0o644, data.len() as u64, tar::EntryType::Regular);
        h.set_cksum();
        out.append(&h, data)
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &index)?;
    for (digest, data) in [
        (&layer_digest, layer),
        (&config_digest, config.as_slice()),
        (&manifest_digest, manifest.as_slice()),
    ] {
        put(
            &format!("blobs/sha256/{}", &digest["sha256:".len()..]),
            data,
        )?;
    }
    out.into_inner()
}

fn busybox_binary(path: &Path) -> Result<Vec<u8>, Error> {
    let data = std::fs::read(path).map_err(|source| Error::Busybox {
        path: path.display().to_string(),
        source,
    })?;
    // A dynamically linked busybox (Debian's `busybox`) would not run in an image without libc.
    if has_interpreter(&data) {
        return Err(Error::Busybox {
            path: path.display().to_string(),
            source: std::io::Error::other("it is dynamically linked"),
        });
    }
    Ok(data)
}

/// Whether a 64-bit little-endian ELF file names a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 8]| u64::from_le_bytes(b) as usize)
    };
    if !elf.starts_with(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(size), Some(num)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..num).any(|i| {
        elf.get(phoff + i * size..phoff + i * size + 4)
            .is_some_and(|t| t == [3, 0, 0, 0])
    })
}

/// The pause image: busybox sleeping forever as the sandbox's first process.
pub fn pause(busybox: &Path) -> Result<Vec<u8>, Error> {
    let entries = vec![
        Entry::Dir("bin/", 0o755),
        Entry::File("bin/busybox".into(), 0o755, busybox_binary(busybox)?),
    ];
    Ok(oci_archive(
        PAUSE_IMAGE,
        &layer(&entries)?,
        json!({"config": {"Entrypoint": ["/bin/busybox", "sleep", "infinity"], "Env": [PATH_ENV], "WorkingDir": "/"}}),
    )?)
}

/// The busybox image: every applet on the PATH (sh, httpd, nc, wget, tar, ...), /etc/passwd
/// and a world-writable /tmp; runs `sh` by default.
pub fn busybox(busybox: &Path, name: &str) -> Result<Vec<u8>, Error> {
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| Error::Applets(e.to_string()))?;
    if !out.status.success() {
        return Err(Error::Applets(String::from_utf8_lossy(&out.stderr).into()));
    }
    let mut entries = vec![
        Entry::Dir("bin/", 0o755),
        Entry::Dir("sbin/", 0o755),
        Entry::Dir("usr/", 0o755),
        Entry::Dir("usr/bin/", 0o755),
        Entry::Dir("usr/sbin/", 0o755),
        Entry::Dir("etc/", 0o755),
        Entry::Dir("root/", 0o700),
        Entry::Dir("tmp/", 0o1777),
        Entry::Dir("var/", 0o755),
        Entry::Dir("var/www/", 0o755),
        Entry::File("bin/busybox".into(), 0o755, busybox_binary(busybox)?),
        Entry::File(
            "etc/passwd".into(),
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
        ),
        Entry::File(
            "etc/group".into(),
            0o644,
            b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        ),
    ];
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" || !applet.contains('/') {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        entries.push(Entry::Symlink(applet.to_string(), target));
    }
    Ok(oci_archive(
        name,
        &layer(&entries)?,
        json!({"config": {"Cmd": ["sh"], "Env": [PATH_ENV], "WorkingDir": "/"}}),
    )?)
}

/// Writes `data` to `path` unless a file with the same bytes is already there.
pub fn write_if_changed(path: &Path, data: &[u8]) -> std::io::Result<bool> {
    if std::fs::read(path).ok().as_deref() == Some(data) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(archive);
        let mut out = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            out.push((path, data));
        }
        out
    }

    #[test]
    fn archive_is_a_consistent_oci_layout() {
        let fake = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(fake.path(), b"\x7fELF not really").unwrap();
        let a = pause(fake.path()).unwrap();
        assert_eq!(a, pause(fake.path()).unwrap(), "deterministic");
        let outer = files(&a);
        let get = |p: &str| {
            outer
                .iter()
                .find(|(n, _)| n == p)
                .map(|(_, d)| d.clone())
                .unwrap_or_else(|| panic!("{p} missing"))
        };
        let index: Value = serde_json::from_slice(&get("index.json")).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"]["io.containerd.image.name"], PAUSE_IMAGE);
        let digest = m["digest"].as_str().unwrap();
        let manifest_bytes = get(&format!("blobs/sha256/{}", &digest[7..]));
        assert_eq!(format!("sha256:{}", sha256(&manifest_bytes)), digest);
        let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
        for blob in [&manifest["config"], &manifest["layers"][0]] {
            let d = blob["digest"].as_str().unwrap();
            let data = get(&format!("blobs/sha256/{}", &d[7..]));
            assert_eq!(format!("sha256:{}", sha256(&data)), d);
            assert_eq!(blob["size"], data.len());
        }
        let layer = get(&format!(
            "blobs/sha256/{}",
            &manifest["layers"][0]["digest"].as_str().unwrap()[7..]
        ));
        let inner = files(&layer);
        assert!(inner
            .iter()
            .any(|(p, d)| p == "bin/busybox" && d == b"\x7fELF not really"));
    }

    #[test]
    fn static_and_dynamic_binaries() {
        // Whatever runs these tests is dynamically linked; Debian's busybox-static is not.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        if let Ok(bb) = std::fs::read(BUSYBOX_BINARY) {
            assert!(!has_interpreter(&bb));
        }
        assert!(!has_interpreter(b"\x7fELF short"));
    }

    #[test]
    fn missing_busybox_is_a_clear_error() {
        let e = pause(Path::new("/nonexistent/busybox")).unwrap_err();
        assert!(e.to_string().contains("busybox-static"), "{e}");
    }
}
