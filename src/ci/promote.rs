//! Promotion: point a tag at the exact manifest another reference names, on the
//! registry, without moving layer bytes. Across repositories, blobs are mounted
//! (`POST ...?mount=&from=`) and child manifests of an index are copied by digest before
//! the tag is written, so the registry accepts the manifest with everything present.

use anyhow::{Context, bail};
use serde::Serialize;

use crate::client::{Client, ImageRef, Manifest};
use crate::oci::manifest::{self, is_manifest_type};
use crate::oci::{Digest, Reference, RepoName};

/// What a promotion did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Outcome {
    pub source: String,
    pub target: String,
    /// The digest the target now points at.
    pub digest: String,
    pub media_type: String,
    /// What the target pointed at before; None if it did not exist.
    pub previous: Option<String>,
    /// Blobs linked into the target repository from the source.
    pub mounted_blobs: usize,
    /// Child manifests of an index copied into the target repository.
    pub copied_manifests: usize,
    pub dry_run: bool,
}

impl Outcome {
    pub fn changed(&self) -> bool {
        self.previous.as_deref() != Some(self.digest.as_str())
    }
}

/// Re-points `target` (a tag) at what `source` names, on the registry `client` talks to.
pub async fn promote(
    client: &Client,
    source: &ImageRef,
    target: &ImageRef,
    dry_run: bool,
) -> anyhow::Result<Outcome> {
    let Some(tag) = target.tag() else {
        bail!("the target {target} must name a tag, not a digest");
    };
    let src = client
        .manifest(&source.repo, &source.reference)
        .await?
        .with_context(|| format!("{source} does not exist on {}", client.host()))?;
    let tag_ref = Reference::Tag(tag.to_owned());
    let previous = client.manifest_digest(&target.repo, &tag_ref).await?;
    let mut outcome = Outcome {
        source: source.to_string(),
        target: target.to_string(),
        digest: src.digest.clone(),
        media_type: src.media_type.clone(),
        previous,
        mounted_blobs: 0,
        copied_manifests: 0,
        dry_run,
    };
    if !outcome.changed() {
        return Ok(outcome);
    }
    if source.repo != target.repo {
        let mut copy = Copy {
            client,
            from: &source.repo,
            to: &target.repo,
            dry_run,
            outcome: &mut outcome,
        };
        copy.references(&src, 0).await?;
    }
    if !dry_run {
        let written = client.put_manifest(&target.repo, &tag_ref, &src).await?;
        if written != src.digest {
            bail!(
                "the registry stored {target} as {written}, not {}: the manifest was changed in transit",
                src.digest
            );
        }
    }
    Ok(outcome)
}

/// Makes everything a manifest references present in the target repository.
struct Copy<'a> {
    client: &'a Client,
    from: &'a RepoName,
    to: &'a RepoName,
    dry_run: bool,
    outcome: &'a mut Outcome,
}

/// How deep indexes may nest (an index of indexes is allowed, a loop is not).
const MAX_DEPTH: usize = 4;

impl Copy<'_> {
    async fn references(&mut self, m: &Manifest, depth: usize) -> anyhow::Result<()> {
        let parsed = manifest::parse(&m.bytes, Some(&m.media_type))
            .with_context(|| format!("the manifest {} is not valid", m.digest))?;
        for (digest, _) in &parsed.blobs {
            self.blob(digest).await?;
        }
        let shape = manifest::shape(&m.bytes).unwrap_or_default();
        for entry in &shape.entries {
            let digest: Digest = entry
                .digest
                .parse()
                .with_context(|| format!("the index {} lists an invalid digest", m.digest))?;
            if !is_manifest_type(&entry.media_type) {
                // A build cache index lists blobs.
                self.blob(&digest).await?;
                continue;
            }
            if depth >= MAX_DEPTH {
                bail!(
                    "indexes nest deeper than {MAX_DEPTH} levels under {}",
                    m.digest
                );
            }
            let by_digest = Reference::Digest(digest.clone());
            if self
                .client
                .manifest_digest(self.to, &by_digest)
                .await?
                .is_some()
            {
                continue;
            }
            let child = self
                .client
                .manifest(self.from, &by_digest)
                .await?
                .with_context(|| {
                    format!("{}@{digest} is listed by the index but missing", self.from)
                })?;
            Box::pin(self.references(&child, depth + 1)).await?;
            if !self.dry_run {
                self.client
                    .put_manifest(self.to, &by_digest, &child)
                    .await?;
            }
            self.outcome.copied_manifests += 1;
        }
        Ok(())
    }

    async fn blob(&mut self, digest: &Digest) -> anyhow::Result<()> {
        if self.client.blob_exists(self.to, digest.as_str()).await? {
            return Ok(());
        }
        if !self.dry_run
            && !self
                .client
                .mount(self.to, self.from, digest.as_str())
                .await?
        {
            bail!(
                "the registry could not mount {digest} from {} into {}: the source must hold the blob and you need pull on {} and push on {}",
                self.from,
                self.to,
                self.from,
                self.to
            );
        }
        self.outcome.mounted_blobs += 1;
        Ok(())
    }
}
