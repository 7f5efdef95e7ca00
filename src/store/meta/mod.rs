//! Registry metadata: repositories, blob links, manifests, tags, references, uploads.
//! One trait, one test suite (`tests::suite`) every backend passes. SQLite is the embedded
//! default; a PostgreSQL backend implements the same trait over the same schema.

pub mod auth;
pub mod events;
mod sqlite;
mod sqlite_auth;
mod sqlite_events;

use async_trait::async_trait;
use bytes::Bytes;

pub use sqlite::{SqliteMeta, now_ms};

use super::policy::TagPolicy;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A manifest references a blob the repository does not hold.
    #[error("blob {0} is not in the repository")]
    MissingBlob(String),
    /// An index references a manifest the repository does not hold.
    #[error("manifest {0} is not in the repository")]
    MissingManifest(String),
    #[error("descriptor of {digest} says {declared} bytes but the content has {actual}")]
    SizeMismatch {
        digest: String,
        declared: i64,
        actual: i64,
    },
    #[error("{0} already exists")]
    Conflict(String),
    /// A tag protected by an immutability policy would be moved or deleted.
    #[error("tag {tag:?} of {repository} cannot be changed: {policy}")]
    Immutable {
        repository: String,
        tag: String,
        policy: String,
    },
    /// A delete would leave a tagged manifest incomplete.
    #[error("{what} is needed by tag {tag:?} (manifest {manifest}){}; delete the tag first", policy.as_ref().map(|p| format!(", which {p} protects")).unwrap_or_default())]
    InUse {
        what: String,
        tag: String,
        manifest: String,
        policy: Option<String>,
    },
    #[error("the metadata database is busy")]
    Busy,
    /// A bound on what may be open at once (uploads of a repository) was reached.
    #[error("{0}")]
    Limit(String),
    /// The disk under the database is full.
    #[error("the metadata database's disk is full")]
    Full,
    #[error("metadata database: {0}")]
    Db(String),
}

/// Who makes a change: the actor of its event, and its audit row (written in the
/// transaction that makes the change, so a change is never made unrecorded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Who {
    pub actor: Option<String>,
    /// `password` or a token's id.
    pub credential: Option<String>,
    pub client: Option<String>,
}

/// Uploads open at once in one repository, at most.
pub const MAX_OPEN_UPLOADS: i64 = 1000;

/// A stored manifest.
#[derive(Debug, Clone)]
pub struct ManifestRecord {
    pub digest: String,
    pub media_type: String,
    pub content: Bytes,
}

/// A manifest to store, with what it references and the tags to point at it.
#[derive(Debug, Clone)]
pub struct NewManifest {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub subject: Option<String>,
    /// Annotations as a JSON object, for the referrers API.
    pub annotations: Option<String>,
    pub content: Bytes,
    pub blobs: Vec<(String, i64)>,
    /// Index entries: each must be a manifest or a blob of the repository.
    pub children: Vec<(String, i64)>,
    pub tags: Vec<String>,
    /// Who pushed it, for the event and the audit row it makes.
    pub by: Who,
}

/// A manifest whose `subject` is a given digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Referrer {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub annotations: Option<String>,
    pub size: i64,
}

/// A tag with its manifest, for the tag details listing.
#[derive(Debug, Clone)]
pub struct TagRow {
    pub name: String,
    pub digest: String,
    pub media_type: String,
    pub content: Bytes,
    /// When the tag was last pointed at a manifest (unix milliseconds).
    pub updated_at: i64,
}

/// A registry change, as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub id: i64,
    /// The id receivers de-duplicate on.
    pub uuid: String,
    /// Unix milliseconds.
    pub at: i64,
    /// `push` (a new manifest, once per tag it was pushed with), `tag` (an existing
    /// manifest given a tag: a promotion or re-tag), `untag`, `delete` (a manifest).
    pub action: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
    pub media_type: Option<String>,
    pub size: Option<i64>,
    pub actor: Option<String>,
}

/// The order of a tag details listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagOrder {
    /// Most recently pushed first (Docker Hub's default).
    NewestFirst,
    OldestFirst,
    Name,
    NameDesc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub repository: String,
    pub size: u64,
    /// The digest its bytes were verified to have, once they were (just before they are
    /// renamed into place).
    pub digest: Option<String>,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// The blob's size if `repo` links it.
    async fn linked_blob(&self, repo: &str, digest: &str) -> Result<Option<u64>, MetaError>;
    /// Links `digest` into `repo` if `from` links it; returns its size, or None. A mount
    /// reads across repositories, so it is audited (in its transaction).
    async fn mount_blob(
        &self,
        repo: &str,
        from: &str,
        digest: &str,
        by: &Who,
    ) -> Result<Option<u64>, MetaError>;
    /// Removes `repo`'s link to `digest`; false if there was none. Refused with
    /// `InUse` if a manifest reachable from a tag of `repo` references the blob.
    async fn unlink_blob(&self, repo: &str, digest: &str, by: &Who) -> Result<bool, MetaError>;

    /// Opens an upload; `monolithic` for a whole blob in one request, which no client can
    /// resume.
    async fn upload_create(&self, id: &str, repo: &str, monolithic: bool) -> Result<(), MetaError>;
    async fn upload_get(&self, id: &str) -> Result<Option<UploadRow>, MetaError>;
    async fn upload_set_size(&self, id: &str, size: u64) -> Result<(), MetaError>;
    /// Records that the upload's bytes have `digest`, before they become that blob.
    async fn upload_verified(&self, id: &str, digest: &str) -> Result<(), MetaError>;
    async fn upload_delete(&self, id: &str) -> Result<bool, MetaError>;
    /// Ids of uploads last written before `before_ms` (unix milliseconds); only the
    /// monolithic ones if `monolithic_only`.
    async fn uploads_idle_since(
        &self,
        before_ms: i64,
        monolithic_only: bool,
    ) -> Result<Vec<String>, MetaError>;
    /// In one transaction: records the blob, links it into the upload's repository, and
    /// closes the upload.
    async fn upload_complete(
        &self,
        id: &str,
        repo: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), MetaError>;

    /// In one transaction: checks every reference is present in the repository, stores the
    /// manifest and its references, and points its tags at it.
    async fn manifest_put(&self, repo: &str, m: NewManifest) -> Result<(), MetaError>;
    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<ManifestRecord>, MetaError>;
    async fn manifest_by_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<ManifestRecord>, MetaError>;
    /// Deletes a manifest and every tag on it; false if it was not there. Refused with
    /// `InUse` if an index reachable from another tag references it.
    async fn manifest_delete(&self, repo: &str, digest: &str, by: &Who) -> Result<bool, MetaError>;
    async fn tag_delete(&self, repo: &str, tag: &str, by: &Who) -> Result<bool, MetaError>;

    /// Up to `limit` tags after `last`, sorted; None if the repository does not exist.
    async fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<String>>, MetaError>;
    /// Up to `limit` repository names after `last`, sorted.
    async fn repositories(&self, last: Option<&str>, limit: u32) -> Result<Vec<String>, MetaError>;
    /// Up to `limit` repository names in `keys` after `last`, sorted; the work is bounded
    /// by `limit` and the number of ranges, not by the number of repositories.
    async fn repositories_in(
        &self,
        keys: &crate::oci::keyset::KeySet,
        last: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, MetaError>;
    async fn referrers(&self, repo: &str, subject: &str) -> Result<Vec<Referrer>, MetaError>;
    /// The number of tags and one page of them with their manifests; None if the
    /// repository does not exist.
    async fn tag_page(
        &self,
        repo: &str,
        order: TagOrder,
        offset: u64,
        limit: u32,
    ) -> Result<Option<(u64, Vec<TagRow>)>, MetaError>;

    /// Up to `limit` events with an id above `after`, oldest first.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRecord>, MetaError>;

    /// Adds a tag immutability policy; returns its id.
    async fn policy_add(
        &self,
        repositories: &str,
        tags: &[String],
        by: Option<&str>,
    ) -> Result<i64, MetaError>;
    async fn policies(&self) -> Result<Vec<TagPolicy>, MetaError>;
    async fn policy_remove(&self, id: i64) -> Result<bool, MetaError>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn manifest(digest: String, blobs: Vec<(String, i64)>, tags: &[&str]) -> NewManifest {
        NewManifest {
            digest,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: None,
            subject: None,
            annotations: None,
            content: Bytes::from_static(b"{}"),
            blobs,
            children: vec![],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            by: Who {
                actor: Some("tester".into()),
                ..Who::default()
            },
        }
    }

    pub(crate) async fn suite(m: &dyn MetaStore) {
        // Uploads.
        m.upload_create("up1", "team/api", false).await.unwrap();
        assert_eq!(
            m.upload_get("up1").await.unwrap(),
            Some(UploadRow {
                repository: "team/api".into(),
                digest: None,
                size: 0
            })
        );
        m.upload_set_size("up1", 10).await.unwrap();
        assert_eq!(m.upload_get("up1").await.unwrap().unwrap().size, 10);
        // An upload alone does not create the repository.
        assert_eq!(m.tags("team/api", None, 10).await.unwrap(), None);
        m.upload_complete("up1", "team/api", &d(1), 10)
            .await
            .unwrap();
        assert_eq!(m.upload_get("up1").await.unwrap(), None);
        assert_eq!(m.linked_blob("team/api", &d(1)).await.unwrap(), Some(10));
        assert_eq!(m.linked_blob("other", &d(1)).await.unwrap(), None);
        assert_eq!(m.tags("team/api", None, 10).await.unwrap(), Some(vec![]));

        // Mount needs a link in the source.
        assert_eq!(
            m.mount_blob("other", "nowhere", &d(1), &Who::default())
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            m.mount_blob("other", "team/api", &d(1), &Who::default())
                .await
                .unwrap(),
            Some(10)
        );
        assert_eq!(m.linked_blob("other", &d(1)).await.unwrap(), Some(10));

        // Manifests must find their blobs, with the right sizes.
        let e = m
            .manifest_put("team/api", manifest(d(9), vec![(d(2), 1)], &["x"]))
            .await;
        assert!(
            matches!(e, Err(MetaError::MissingBlob(ref b)) if *b == d(2)),
            "{e:?}"
        );
        let e = m
            .manifest_put("team/api", manifest(d(9), vec![(d(1), 11)], &["x"]))
            .await;
        assert!(matches!(e, Err(MetaError::SizeMismatch { .. })), "{e:?}");
        assert!(m.manifest_by_tag("team/api", "x").await.unwrap().is_none());
        m.manifest_put(
            "team/api",
            manifest(d(9), vec![(d(1), 10)], &["v1", "latest"]),
        )
        .await
        .unwrap();
        assert_eq!(
            m.manifest_by_tag("team/api", "latest")
                .await
                .unwrap()
                .unwrap()
                .digest,
            d(9)
        );
        assert!(
            m.manifest_by_digest("team/api", &d(9))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            m.manifest_by_digest("other", &d(9))
                .await
                .unwrap()
                .is_none()
        );

        // An index needs its children in the same repository.
        let mut idx = manifest(d(10), vec![], &["multi"]);
        idx.media_type = "application/vnd.oci.image.index.v1+json".into();
        idx.children = vec![(d(9), 2)];
        assert!(matches!(
            m.manifest_put("other", idx.clone()).await,
            Err(MetaError::MissingManifest(_))
        ));
        m.manifest_put("team/api", idx).await.unwrap();

        // Referrers.
        let mut sig = manifest(d(11), vec![(d(1), 10)], &[]);
        sig.subject = Some(d(9));
        sig.artifact_type = Some("application/example".into());
        m.manifest_put("team/api", sig).await.unwrap();
        let r = m.referrers("team/api", &d(9)).await.unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].artifact_type.as_deref(), Some("application/example"));
        assert!(m.referrers("other", &d(9)).await.unwrap().is_empty());

        // Tags: sorted, paginated.
        assert_eq!(
            m.tags("team/api", None, 10).await.unwrap().unwrap(),
            vec!["latest", "multi", "v1"]
        );
        assert_eq!(
            m.tags("team/api", Some("latest"), 1)
                .await
                .unwrap()
                .unwrap(),
            vec!["multi"]
        );
        assert_eq!(
            m.repositories(None, 10).await.unwrap(),
            vec!["other", "team/api"]
        );
        assert_eq!(
            m.repositories(Some("other"), 10).await.unwrap(),
            vec!["team/api"]
        );
        {
            use crate::oci::keyset::KeySet;
            let team = KeySet::prefix("team/");
            assert_eq!(
                m.repositories_in(&team, None, 10).await.unwrap(),
                ["team/api"]
            );
            assert!(
                m.repositories_in(&team, Some("team/api"), 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            let both = team.union(&KeySet::one("other"));
            assert_eq!(
                m.repositories_in(&both, None, 10).await.unwrap(),
                ["other", "team/api"]
            );
            assert_eq!(m.repositories_in(&both, None, 1).await.unwrap(), ["other"]);
            assert_eq!(
                m.repositories_in(&both, Some("other"), 5).await.unwrap(),
                ["team/api"]
            );
            assert!(
                m.repositories_in(&KeySet::empty(), None, 5)
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(
                m.repositories_in(&KeySet::all(), None, 5)
                    .await
                    .unwrap()
                    .len(),
                2
            );
        }

        // Deletes.
        assert!(
            m.tag_delete("team/api", "v1", &Who::default())
                .await
                .unwrap()
        );
        assert!(
            !m.tag_delete("team/api", "v1", &Who::default())
                .await
                .unwrap()
        );
        assert!(
            m.manifest_by_digest("team/api", &d(9))
                .await
                .unwrap()
                .is_some()
        );
        // Nothing a tag needs can go: d(9) is a child of the index tagged `multi`, and
        // blob d(1) is a layer of d(9).
        let e = m.manifest_delete("team/api", &d(9), &Who::default()).await;
        assert!(
            matches!(&e, Err(MetaError::InUse { tag, manifest, .. }) if tag == "multi" && *manifest == d(10)),
            "{e:?}"
        );
        let e = m.unlink_blob("team/api", &d(1), &Who::default()).await;
        assert!(
            matches!(&e, Err(MetaError::InUse { tag, .. }) if tag == "latest"),
            "{e:?}"
        );
        assert!(m.linked_blob("team/api", &d(1)).await.unwrap().is_some());
        assert!(
            m.tag_delete("team/api", "multi", &Who::default())
                .await
                .unwrap()
        );
        // The manifest's own tags go with it.
        assert!(
            m.manifest_delete("team/api", &d(9), &Who::default())
                .await
                .unwrap()
        );
        assert!(
            m.manifest_by_tag("team/api", "latest")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            !m.manifest_delete("team/api", &d(9), &Who::default())
                .await
                .unwrap()
        );
        // Only untagged manifests reference d(1) now.
        assert!(
            m.unlink_blob("team/api", &d(1), &Who::default())
                .await
                .unwrap()
        );
        assert!(
            m.unlink_blob("other", &d(1), &Who::default())
                .await
                .unwrap()
        );
        assert!(
            !m.unlink_blob("other", &d(1), &Who::default())
                .await
                .unwrap()
        );
        assert!(m.upload_create("up2", "x", false).await.is_ok());
        assert!(m.upload_create("up3", "x", true).await.is_ok());
        assert_eq!(
            m.uploads_idle_since(0, false).await.unwrap(),
            Vec::<String>::new()
        );
        let mut idle = m.uploads_idle_since(i64::MAX, false).await.unwrap();
        idle.sort();
        assert_eq!(idle, ["up2", "up3"]);
        assert_eq!(m.uploads_idle_since(i64::MAX, true).await.unwrap(), ["up3"]);
        m.upload_verified("up3", &d(3)).await.unwrap();
        assert_eq!(
            m.upload_get("up3").await.unwrap().unwrap().digest,
            Some(d(3))
        );
        assert!(m.upload_delete("up3").await.unwrap());
        assert!(m.upload_delete("up2").await.unwrap());
        assert!(!m.upload_delete("up2").await.unwrap());

        // Tag details: count and pages with their manifests, in the asked order.
        m.manifest_put("pol/app", manifest(d(20), vec![], &["a", "b"]))
            .await
            .unwrap();
        m.manifest_put("pol/app", manifest(d(21), vec![], &["c"]))
            .await
            .unwrap();
        let (count, page) = m
            .tag_page("pol/app", TagOrder::Name, 1, 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(count, 3);
        let names: Vec<_> = page.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(page[1].digest, d(21));
        let (_, page) = m
            .tag_page("pol/app", TagOrder::NameDesc, 0, 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(page[0].name, "c");
        assert!(
            m.tag_page("nowhere", TagOrder::Name, 0, 1)
                .await
                .unwrap()
                .is_none()
        );

        // Immutability: a protected tag neither moves nor goes; a re-push of the same
        // manifest and unprotected tags are fine.
        let id = m
            .policy_add("pol/*", &["v*".into(), "[0-9]*".into()], Some("admin"))
            .await
            .unwrap();
        m.manifest_put("pol/app", manifest(d(20), vec![], &["1.0.0", "prod"]))
            .await
            .unwrap();
        m.manifest_put("pol/app", manifest(d(20), vec![], &["1.0.0"]))
            .await
            .unwrap();
        let e = m
            .manifest_put("pol/app", manifest(d(21), vec![], &["prod", "1.0.0"]))
            .await;
        assert!(
            matches!(e, Err(MetaError::Immutable { ref tag, .. }) if tag == "1.0.0"),
            "{e:?}"
        );
        // The failed push changed nothing, not even the movable tag it also named.
        assert_eq!(
            m.manifest_by_tag("pol/app", "prod")
                .await
                .unwrap()
                .unwrap()
                .digest,
            d(20)
        );
        m.manifest_put("pol/app", manifest(d(21), vec![], &["prod"]))
            .await
            .unwrap();
        assert!(matches!(
            m.tag_delete("pol/app", "1.0.0", &Who::default()).await,
            Err(MetaError::Immutable { .. })
        ));
        assert!(matches!(
            m.manifest_delete("pol/app", &d(20), &Who::default()).await,
            Err(MetaError::Immutable { .. })
        ));
        assert!(
            m.tag_delete("pol/app", "prod", &Who::default())
                .await
                .unwrap()
        );
        let listed = m.policies().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].tags, ["v*", "[0-9]*"]);
        assert_eq!(listed[0].created_by.as_deref(), Some("admin"));
        assert!(m.policy_remove(id).await.unwrap());
        assert!(!m.policy_remove(id).await.unwrap());
        assert!(
            m.tag_delete("pol/app", "1.0.0", &Who::default())
                .await
                .unwrap()
        );

        // The outbox recorded each change of pol/app, in order, and nothing for the
        // refused pushes or the re-push that changed nothing.
        let events: Vec<_> = m
            .events_after(0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.repository == "pol/app")
            .map(|e| (e.action, e.tag, e.digest))
            .collect();
        let ev = |a: &str, t: &str, n: u8| (a.to_owned(), Some(t.to_owned()), d(n));
        assert_eq!(
            events,
            vec![
                ev("push", "a", 20),
                ev("push", "b", 20),
                ev("push", "c", 21),
                ev("tag", "1.0.0", 20),
                ev("tag", "prod", 20),
                ev("tag", "prod", 21),
                ev("untag", "prod", 21),
                ev("untag", "1.0.0", 20),
            ]
        );
        let all = m.events_after(0, 1000).await.unwrap();
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        assert!(all.iter().any(|e| e.action == "delete" && e.digest == d(9)));
        let first = &all[0];
        assert_eq!(first.actor.as_deref(), Some("tester"));
        assert_eq!(m.events_after(first.id, 1).await.unwrap()[0].id, all[1].id);
    }
}
