//! Manifest parsing: just enough to know a manifest's kind and what it references.
//! The raw bytes are what is stored and hashed; nothing here re-serializes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Media types of layers that need not be pushed (their `urls` point elsewhere).
const NON_DISTRIBUTABLE: &[&str] = &[
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// The manifest media types this registry stores.
pub const MANIFEST_TYPES: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

pub fn is_manifest_type(media_type: &str) -> bool {
    MANIFEST_TYPES.contains(&media_type)
}

pub fn is_index_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// A content descriptor as the image-spec defines it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// What a manifest is, and what it points at.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    pub media_type: String,
    /// `artifactType`, or for an image manifest without one, its config's media type.
    pub artifact_type: Option<String>,
    pub subject: Option<Digest>,
    pub annotations: Option<BTreeMap<String, String>>,
    /// Blobs that must be present in the repository (config and distributable layers).
    pub blobs: Vec<(Digest, i64)>,
    /// Manifests (or, for buildx caches, blobs) an index lists; each must be present.
    pub children: Vec<(Digest, i64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest schema version 1 is not supported; push with schema version 2 or OCI")]
    Schema1,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("manifest mediaType {body:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("{0}")]
    Invalid(String),
}

fn descriptor_digest(d: &Descriptor, what: &str) -> Result<(Digest, i64), ManifestError> {
    let digest: Digest = d
        .digest
        .parse()
        .map_err(|e| ManifestError::Invalid(format!("{what} has an invalid digest: {e}")))?;
    if d.size < 0 {
        return Err(ManifestError::Invalid(format!(
            "{what} has a negative size"
        )));
    }
    Ok((digest, d.size))
}

/// Parses `body`, sent with `content_type` (the request's Content-Type, if any).
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, ManifestError> {
    let raw: Raw = serde_json::from_slice(body).map_err(|e| ManifestError::Json(e.to_string()))?;
    // Content-Type may carry parameters; only the type itself counts.
    let header = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| !c.is_empty());
    if [Some(DOCKER_SCHEMA1), Some(DOCKER_SCHEMA1_SIGNED)]
        .iter()
        .any(|s| header.as_deref() == *s || raw.media_type.as_deref() == *s)
        || raw.schema_version == Some(1)
    {
        return Err(ManifestError::Schema1);
    }
    let media_type = match (&header, &raw.media_type) {
        (Some(h), body_type) if is_manifest_type(h) => {
            if let Some(b) = body_type {
                if b != h {
                    return Err(ManifestError::MediaTypeMismatch {
                        body: b.clone(),
                        header: h.clone(),
                    });
                }
            }
            h.clone()
        }
        (_, Some(b)) => b.clone(),
        (Some(h), None) if h != "application/json" && h != "application/octet-stream" => {
            return Err(ManifestError::UnsupportedMediaType(h.clone()));
        }
        (_, None) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        (_, None) => OCI_MANIFEST.to_owned(),
    };
    if !is_manifest_type(&media_type) {
        return Err(ManifestError::UnsupportedMediaType(media_type));
    }
    if raw.schema_version != Some(2) {
        return Err(ManifestError::Invalid("schemaVersion must be 2".into()));
    }
    let subject = match &raw.subject {
        Some(s) => Some(descriptor_digest(s, "subject")?.0),
        None => None,
    };
    let mut parsed = ParsedManifest {
        media_type: media_type.clone(),
        artifact_type: raw.artifact_type.clone(),
        subject,
        annotations: raw.annotations,
        blobs: Vec::new(),
        children: Vec::new(),
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| ManifestError::Invalid("image manifest has no config".into()))?;
            let layers = raw.layers.ok_or_else(|| {
                ManifestError::Invalid("image manifest has no layers array".into())
            })?;
            if raw.manifests.is_some() {
                return Err(ManifestError::Invalid(
                    "an image manifest cannot list manifests".into(),
                ));
            }
            parsed.blobs.push(descriptor_digest(&config, "config")?);
            if parsed.artifact_type.is_none() {
                parsed.artifact_type = Some(config.media_type.clone());
            }
            for (i, layer) in layers.iter().enumerate() {
                let d = descriptor_digest(layer, &format!("layer {i}"))?;
                if !NON_DISTRIBUTABLE.contains(&layer.media_type.as_str()) {
                    parsed.blobs.push(d);
                }
            }
        }
        _ => {
            let manifests = raw
                .manifests
                .ok_or_else(|| ManifestError::Invalid("index has no manifests array".into()))?;
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(ManifestError::Invalid(
                    "an index cannot have config or layers".into(),
                ));
            }
            for (i, m) in manifests.iter().enumerate() {
                parsed
                    .children
                    .push(descriptor_digest(m, &format!("manifests[{i}]"))?);
            }
        }
    }
    Ok(parsed)
}

/// What a listing shows of a stored manifest: for an image manifest its config and the
/// total size of its layers; for an index its entries.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    pub config: Option<Descriptor>,
    pub layers_size: u64,
    pub entries: Vec<Descriptor>,
}

/// The shape of a manifest already accepted by [`parse`]; None if it no longer parses.
pub fn shape(body: &[u8]) -> Option<Shape> {
    let raw: Raw = serde_json::from_slice(body).ok()?;
    let layers_size = raw
        .layers
        .iter()
        .flatten()
        .map(|l| u64::try_from(l.size).unwrap_or(0))
        .sum();
    Some(Shape {
        config: raw.config,
        layers_size,
        entries: raw.manifests.unwrap_or_default(),
    })
}

/// Config media types that describe a runnable image (and so carry os and architecture).
pub const IMAGE_CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// An image's platform, as an index entry or an image config gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// From a JSON object with `os` and `architecture` (an index entry's `platform`, or an
    /// image config). None for missing fields and for buildx's `unknown/unknown`
    /// attestation entries.
    pub fn from_json(v: &serde_json::Value) -> Option<Platform> {
        let p = Platform::deserialize(v).ok()?;
        (p.os != "unknown" && !p.os.is_empty() && !p.architecture.is_empty()).then_some(p)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(media: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":0}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D}","size":0}}]}}"#
        )
    }

    #[test]
    fn image_manifest() {
        let p = parse(image(OCI_MANIFEST).as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.media_type, OCI_MANIFEST);
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        // No Content-Type: the body's mediaType decides.
        assert_eq!(
            parse(image(DOCKER_MANIFEST).as_bytes(), None)
                .unwrap()
                .media_type,
            DOCKER_MANIFEST
        );
    }

    #[test]
    fn mismatches_and_junk() {
        assert!(matches!(
            parse(image(OCI_MANIFEST).as_bytes(), Some(DOCKER_MANIFEST)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        assert!(matches!(parse(b"{", None), Err(ManifestError::Json(_))));
        assert!(matches!(parse(b"[]", None), Err(ManifestError::Json(_))));
        assert!(matches!(
            parse(br#"{"schemaVersion":1,"name":"x"}"#, None),
            Err(ManifestError::Schema1)
        ));
        assert!(matches!(
            parse(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#, None),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        let bad_digest = image(OCI_MANIFEST).replacen(D, "sha256:nothex", 1);
        assert!(matches!(
            parse(bad_digest.as_bytes(), None),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn index_children() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1}}}}"#
        );
        let p = parse(idx.as_bytes(), None).unwrap();
        assert_eq!(p.children.len(), 1);
        assert_eq!(p.subject.unwrap().as_str(), D);
    }
}
