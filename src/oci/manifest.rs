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

/// The deepest nesting of arrays and objects accepted in a manifest. Real manifests nest
/// about five deep; the bound keeps a hostile one from costing stack or time anywhere
/// that reads it later.
pub const MAX_DEPTH: usize = 32;

/// Checks that `body`'s arrays and objects nest at most [`MAX_DEPTH`] deep, in one pass
/// over the bytes (before any parser recurses into them).
fn check_depth(body: &[u8]) -> Result<(), ManifestError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ManifestError::Invalid(format!(
                        "manifest nests deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

const TOP_KEYS: &[&str] = &[
    "schemaVersion",
    "mediaType",
    "artifactType",
    "config",
    "layers",
    "manifests",
    "subject",
    "annotations",
    "blobs",
];
const DESCRIPTOR_KEYS: &[&str] = &[
    "mediaType",
    "digest",
    "size",
    "urls",
    "annotations",
    "platform",
    "artifactType",
    "data",
];
const PLATFORM_KEYS: &[&str] = &[
    "architecture",
    "os",
    "os.version",
    "os.features",
    "variant",
    "features",
];

/// A key as Go's `encoding/json` compares it with a field name: case folded, with the
/// two non-ASCII letters that fold to ASCII ones (U+017F long s, U+212A Kelvin sign).
fn folded(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '\u{17F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Refuses keys of `obj` that Go clients (docker, containerd) would read as one of
/// `known` although they are not spelled so: Go matches field names ignoring case, so a
/// manifest with `"layers": []` and `"Layers": [...]` would mean one thing here and
/// another there.
fn check_keys(
    obj: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
    at: &str,
) -> Result<(), ManifestError> {
    for key in obj.keys() {
        if known.contains(&key.as_str()) {
            continue;
        }
        let f = folded(key);
        if let Some(k) = known.iter().find(|k| k.to_ascii_lowercase() == f) {
            return Err(ManifestError::Invalid(format!(
                "{at}has a key {key:?}, which clients would read as {k:?}; spell it {k:?} exactly"
            )));
        }
    }
    Ok(())
}

fn check_descriptor(v: &serde_json::Value, at: &str) -> Result<(), ManifestError> {
    let Some(obj) = v.as_object() else {
        return Ok(()); // the typed parse reports it
    };
    check_keys(obj, DESCRIPTOR_KEYS, at)?;
    if let Some(p) = obj.get("platform").and_then(|p| p.as_object()) {
        check_keys(p, PLATFORM_KEYS, &format!("{at}platform "))?;
    }
    Ok(())
}

/// Checks the shape of a manifest's JSON the typed parse cannot see: nesting depth, and
/// keys differing from known fields only in case.
fn check_structure(body: &[u8]) -> Result<(), ManifestError> {
    check_depth(body)?;
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ManifestError::Json(e.to_string()))?;
    let Some(top) = v.as_object() else {
        return Ok(());
    };
    check_keys(top, TOP_KEYS, "the manifest ")?;
    for key in ["config", "subject"] {
        if let Some(d) = top.get(key) {
            check_descriptor(d, &format!("{key} "))?;
        }
    }
    for key in ["layers", "manifests", "blobs"] {
        for (i, d) in top
            .get(key)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            check_descriptor(d, &format!("{key}[{i}] "))?;
        }
    }
    Ok(())
}

/// Parses `body`, sent with `content_type` (the request's Content-Type, if any).
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, ManifestError> {
    check_structure(body)?;
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
    // A Content-Type that is not a manifest type is refused, whatever the body says.
    if let Some(h) = header.as_deref().filter(|h| !is_manifest_type(h)) {
        return Err(ManifestError::UnsupportedMediaType(h.to_owned()));
    }
    let media_type = match (&header, &raw.media_type) {
        (Some(h), body_type) => {
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
        (None, Some(b)) => b.clone(),
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, None) => OCI_MANIFEST.to_owned(),
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

    #[test]
    fn content_types_that_are_not_manifest_types_are_refused() {
        for ct in ["text/plain", "application/json", "application/octet-stream"] {
            assert!(
                matches!(
                    parse(image(OCI_MANIFEST).as_bytes(), Some(ct)),
                    Err(ManifestError::UnsupportedMediaType(_))
                ),
                "{ct}"
            );
        }
        assert!(
            parse(
                image(OCI_MANIFEST).as_bytes(),
                Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8")
            )
            .is_ok()
        );
    }

    #[test]
    fn keys_that_go_reads_as_known_fields_are_refused() {
        let missing = "sha256:".to_owned() + &"ab".repeat(32);
        let two_lists = image(OCI_MANIFEST).replacen(
            r#""layers":"#,
            &format!(r#""Layers":[{{"mediaType":"x","digest":"{missing}","size":1}}],"layers":"#),
            1,
        );
        assert!(matches!(
            parse(two_lists.as_bytes(), None),
            Err(ManifestError::Invalid(_))
        ));
        for (from, to) in [
            (r#""digest":"#, r#""DIGEST":"#),
            (
                r#""mediaType":"application/vnd.oci.image.config"#,
                r#""mediatype":"application/vnd.oci.image.config"#,
            ),
            (r#""layers":"#, "\"layer\u{17F}\":"),
            (r#""schemaVersion":"#, r#""SchemaVersion":"#),
        ] {
            let m = image(OCI_MANIFEST).replacen(from, to, 1);
            assert_ne!(m, image(OCI_MANIFEST));
            assert!(parse(m.as_bytes(), None).is_err(), "{to}");
        }
        // Annotations are a map: any keys.
        let annotated = image(OCI_MANIFEST).replacen(
            "{",
            r#"{"annotations":{"Layers":"x","MediaType":"y"},"#,
            1,
        );
        assert!(parse(annotated.as_bytes(), None).is_ok());
    }

    #[test]
    fn nesting_is_bounded_even_in_unknown_fields() {
        let nested = |depth: usize| {
            image(OCI_MANIFEST).replacen(
                "{",
                &format!(r#"{{"x":{}1{},"#, "[".repeat(depth), "]".repeat(depth)),
                1,
            )
        };
        assert!(parse(nested(MAX_DEPTH - 1).as_bytes(), None).is_ok());
        assert!(parse(nested(MAX_DEPTH).as_bytes(), None).is_err());
        assert!(parse(nested(100_000).as_bytes(), None).is_err());
        // Brackets inside strings do not count.
        let quoted =
            image(OCI_MANIFEST).replacen("{", &format!(r#"{{"x":"{}","#, "[".repeat(1000)), 1);
        assert!(parse(quoted.as_bytes(), None).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A spelling of `key` that differs from it but that Go's case-insensitive
        /// match reads as it.
        fn variant(key: &'static str) -> impl Strategy<Value = String> {
            proptest::collection::vec(0u8..4, key.len()).prop_filter_map(
                "same spelling",
                move |flips| {
                    let v: String = key
                        .chars()
                        .zip(flips)
                        .map(|(c, f)| match (c, f) {
                            ('s', 3) => '\u{17F}',
                            ('k', 3) | ('K', 3) => '\u{212A}',
                            (c, 1) | (c, 3) => c.to_ascii_uppercase(),
                            (c, 2) => c.to_ascii_lowercase(),
                            (c, _) => c,
                        })
                        .collect();
                    (v != key).then_some(v)
                },
            )
        }

        fn top_key() -> impl Strategy<Value = &'static str> {
            proptest::sample::select(TOP_KEYS.to_vec())
        }

        fn descriptor_key() -> impl Strategy<Value = &'static str> {
            proptest::sample::select(DESCRIPTOR_KEYS.to_vec())
        }

        proptest! {
            #[test]
            fn a_case_variant_of_a_top_level_field_is_refused(v in top_key().prop_flat_map(variant)) {
                let m = image(OCI_MANIFEST).replacen('{', &format!("{{{}:[],", serde_json::to_string(&v).unwrap()), 1);
                prop_assert!(parse(m.as_bytes(), None).is_err());
            }

            #[test]
            fn a_case_variant_of_a_descriptor_field_is_refused(v in descriptor_key().prop_flat_map(variant), layer in any::<bool>()) {
                let at = if layer { r#""layers":[{"# } else { r#""config":{"# };
                let m = image(OCI_MANIFEST).replacen(at, &format!("{at}{}:1,", serde_json::to_string(&v).unwrap()), 1);
                prop_assert!(parse(m.as_bytes(), None).is_err());
            }

            #[test]
            fn a_duplicate_field_is_refused(k in proptest::sample::select(vec!["schemaVersion", "mediaType", "config", "layers"])) {
                let m = image(OCI_MANIFEST).replacen('{', &format!("{{{}:null,", serde_json::to_string(k).unwrap()), 1);
                prop_assert!(parse(m.as_bytes(), None).is_err());
            }

            #[test]
            fn depth_decides_alone(depth in 0usize..80, unknown in "[a-z]{1,8}") {
                prop_assume!(!TOP_KEYS.iter().any(|k| k.eq_ignore_ascii_case(&unknown)));
                let m = image(OCI_MANIFEST).replacen('{', &format!(r#"{{"{unknown}":{}0{},"#, "{\"a\":".repeat(depth), "}".repeat(depth)), 1);
                // The manifest itself is one level; `depth` objects nest inside it.
                prop_assert_eq!(parse(m.as_bytes(), None).is_ok(), depth < MAX_DEPTH);
            }

            #[test]
            fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse(&body, None);
            }
        }
    }
}
