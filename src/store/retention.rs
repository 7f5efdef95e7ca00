//! Retention: rules per repository pattern, each saying exactly what it deletes or keeps,
//! and the planner that turns them and a repository's tags and manifests into deletions.
//!
//! Only `keep-last` (the tags past its count) and `delete-older` name tags to delete;
//! only `delete-untagged` names untagged manifests. `keep`, `keep-pulled`, the top
//! of every `keep-last`, immutability policies and what deploy agents run protect. A rule
//! never deletes what it does not name, whatever other rules exist. Deleting a tag
//! condemns its manifest if that leaves it untagged: garbage collection deletes a
//! condemned manifest once `gc_delay` has passed, and `wharf tag restore` brings the tag
//! back until then.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::policy::{glob_match, parse_tag_globs};
use crate::auth::Pattern;

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RuleAction {
    /// Keep tags matching the globs.
    Keep { tags: Vec<String> },
    /// Keep the `count` most recently pushed tags matching the globs; delete the others
    /// that match.
    KeepLast { count: u32, tags: Vec<String> },
    /// Delete tags matching the globs pushed longer ago than `older_than_ms`.
    DeleteOlder {
        older_than_ms: i64,
        tags: Vec<String>,
    },
    /// Delete manifests untagged for longer than `older_than_ms`.
    DeleteUntagged { older_than_ms: i64 },
    /// Keep whatever was pulled within `within_ms`.
    KeepPulled { within_ms: i64 },
}

impl RuleAction {
    /// The columns a rule is stored as in `retention_rules` (every backend): kind, tags
    /// (comma-separated), count, age in milliseconds.
    pub fn to_row(&self) -> (&'static str, String, u32, i64) {
        match self {
            RuleAction::Keep { tags } => ("keep", tags.join(","), 0, 0),
            RuleAction::KeepLast { count, tags } => ("keep-last", tags.join(","), *count, 0),
            RuleAction::DeleteOlder {
                older_than_ms,
                tags,
            } => ("delete-older", tags.join(","), 0, *older_than_ms),
            RuleAction::DeleteUntagged { older_than_ms } => {
                ("delete-untagged", String::new(), 0, *older_than_ms)
            }
            RuleAction::KeepPulled { within_ms } => ("keep-pulled", String::new(), 0, *within_ms),
        }
    }

    /// The rule [`RuleAction::to_row`] stored.
    pub fn from_row(kind: &str, tags: &str, count: u32, age: i64) -> RuleAction {
        let tags: Vec<String> = tags
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        match kind {
            "keep" => RuleAction::Keep { tags },
            "keep-last" => RuleAction::KeepLast { count, tags },
            "delete-older" => RuleAction::DeleteOlder {
                older_than_ms: age,
                tags,
            },
            "delete-untagged" => RuleAction::DeleteUntagged { older_than_ms: age },
            _ => RuleAction::KeepPulled { within_ms: age },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionRule {
    /// 0 for a rule of the config file.
    pub id: i64,
    /// A repository, `namespace/*`, or `*`.
    pub repositories: String,
    #[serde(flatten)]
    pub action: RuleAction,
    /// `cli` or `config`.
    pub source: String,
}

fn days(ms: i64) -> String {
    let d = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let s = d.as_secs();
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{}s", s)
    }
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleAction::Keep { tags } => write!(f, "keep {}", tags.join(",")),
            RuleAction::KeepLast { count, tags } => {
                write!(f, "keep-last {count} {}", tags.join(","))
            }
            RuleAction::DeleteOlder {
                older_than_ms,
                tags,
            } => write!(
                f,
                "delete {} older than {}",
                tags.join(","),
                days(*older_than_ms)
            ),
            RuleAction::DeleteUntagged { older_than_ms } => {
                write!(f, "delete untagged older than {}", days(*older_than_ms))
            }
            RuleAction::KeepPulled { within_ms } => {
                write!(f, "keep pulled within {}", days(*within_ms))
            }
        }
    }
}

impl fmt::Display for RetentionRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id > 0 {
            write!(
                f,
                "rule {} ({}: {})",
                self.id, self.repositories, self.action
            )
        } else {
            write!(f, "config rule ({}: {})", self.repositories, self.action)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error(transparent)]
    Policy(#[from] super::policy::PolicyError),
    #[error(transparent)]
    Pattern(#[from] crate::auth::scope::PatternError),
    #[error("{0}")]
    Invalid(String),
}

impl RetentionRule {
    /// Checks a rule's pattern and globs.
    pub fn validate(&self) -> Result<(), RuleError> {
        Pattern::parse(&self.repositories)?;
        match &self.action {
            RuleAction::Keep { tags }
            | RuleAction::KeepLast { tags, .. }
            | RuleAction::DeleteOlder { tags, .. } => {
                parse_tag_globs(&tags.join(","))?;
            }
            _ => {}
        }
        match &self.action {
            RuleAction::KeepLast { count: 0, .. } => Err(RuleError::Invalid(
                "keep-last needs a count of at least 1 (to delete every matching tag, use delete-older)".into(),
            )),
            RuleAction::DeleteOlder { older_than_ms, .. }
            | RuleAction::DeleteUntagged { older_than_ms }
                if *older_than_ms <= 0 =>
            {
                Err(RuleError::Invalid("the age must be more than zero".into()))
            }
            _ => Ok(()),
        }
    }

    fn applies(&self, repo: &str) -> bool {
        Pattern::parse(&self.repositories).is_ok_and(|p| p.matches(repo))
    }
}

fn matches_any(globs: &[String], tag: &str) -> bool {
    globs
        .iter()
        .any(|g| glob_match(g.as_bytes(), tag.as_bytes()))
}

/// A rule of the `[[retention]]` tables of wharf.toml: a pattern and exactly one action.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub repositories: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub keep: Option<Vec<String>>,
    pub keep_last: Option<u32>,
    pub delete_older_than: Option<String>,
    pub delete_untagged_older_than: Option<String>,
    pub keep_pulled_within: Option<String>,
}

fn age(s: &str) -> Result<i64, RuleError> {
    let d = crate::time::parse_duration(s).map_err(RuleError::Invalid)?;
    Ok(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl RuleConfig {
    pub fn to_rule(&self) -> Result<RetentionRule, RuleError> {
        let need_tags = || {
            if self.tags.is_empty() {
                Err(RuleError::Invalid(format!(
                    "retention rule for {}: give the tags it applies to (tags = [\"main-*\"])",
                    self.repositories
                )))
            } else {
                Ok(self.tags.clone())
            }
        };
        let mut actions = Vec::new();
        if let Some(k) = &self.keep {
            actions.push(RuleAction::Keep { tags: k.clone() });
        }
        if let Some(n) = self.keep_last {
            actions.push(RuleAction::KeepLast {
                count: n,
                tags: need_tags()?,
            });
        }
        if let Some(a) = &self.delete_older_than {
            actions.push(RuleAction::DeleteOlder {
                older_than_ms: age(a)?,
                tags: need_tags()?,
            });
        }
        if let Some(a) = &self.delete_untagged_older_than {
            actions.push(RuleAction::DeleteUntagged {
                older_than_ms: age(a)?,
            });
        }
        if let Some(a) = &self.keep_pulled_within {
            actions.push(RuleAction::KeepPulled { within_ms: age(a)? });
        }
        if actions.len() != 1 {
            return Err(RuleError::Invalid(format!(
                "retention rule for {}: give exactly one of keep, keep_last, delete_older_than, delete_untagged_older_than, keep_pulled_within",
                self.repositories
            )));
        }
        let rule = RetentionRule {
            id: 0,
            repositories: self.repositories.clone(),
            action: actions.remove(0),
            source: "config".into(),
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// What the planner needs of one repository.
#[derive(Debug, Clone, Default)]
pub struct RepoState {
    /// Tag, digest, when it was pushed (unix ms).
    pub tags: Vec<(String, String, i64)>,
    pub manifests: Vec<ManifestState>,
}

#[derive(Debug, Clone, Default)]
pub struct ManifestState {
    pub digest: String,
    /// Since when it has no tag (None while tagged).
    pub untagged_at: Option<i64>,
    pub pulled_at: Option<i64>,
    /// Another manifest of the repository (an index, a referrer's subject link does not
    /// count) references it.
    pub referenced: bool,
    /// Already condemned by an earlier run.
    pub condemned: bool,
}

/// One deletion of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deletion {
    pub repository: String,
    /// None for an untagged manifest.
    pub tag: Option<String>,
    pub digest: String,
    /// The rule that deletes it.
    pub rule: String,
    /// Bytes the registry would free (blobs nothing else references); filled in later.
    pub bytes: u64,
}

/// What retention deletes in one repository: tags, and the manifests it condemns (those
/// its tag deletions leave untagged, and those a `delete-untagged` rule names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoPlan {
    pub tags: Vec<Deletion>,
    pub condemn: Vec<Deletion>,
}

/// Plans retention for `repo` at `now`. `protected` holds digests that must stay
/// (deployed, or a rollback target); `locked` says whether an immutability policy
/// protects a tag.
pub fn plan(
    repo: &str,
    rules: &[RetentionRule],
    state: &RepoState,
    protected: &HashSet<String>,
    locked: impl Fn(&str) -> bool,
    now: i64,
) -> RepoPlan {
    let rules: Vec<&RetentionRule> = rules.iter().filter(|r| r.applies(repo)).collect();
    if rules.is_empty() {
        return RepoPlan::default();
    }
    let pulled: BTreeMap<&str, i64> = state
        .manifests
        .iter()
        .filter_map(|m| m.pulled_at.map(|p| (m.digest.as_str(), p)))
        .collect();
    let recently_pulled = |digest: &str| {
        rules.iter().any(|r| match r.action {
            RuleAction::KeepPulled { within_ms } => pulled
                .get(digest)
                .is_some_and(|p| *p >= now.saturating_sub(within_ms)),
            _ => false,
        })
    };
    let kept_digest = |digest: &str| protected.contains(digest) || recently_pulled(digest);

    // Tags: newest first, so `keep-last` keeps the first `count` of those matching.
    let mut tags: Vec<&(String, String, i64)> = state.tags.iter().collect();
    tags.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    let mut delete: BTreeMap<&str, String> = BTreeMap::new();
    for r in &rules {
        match &r.action {
            RuleAction::Keep { tags: globs } => {
                keep.extend(
                    tags.iter()
                        .filter(|t| matches_any(globs, &t.0))
                        .map(|t| t.0.as_str()),
                );
            }
            RuleAction::KeepLast { count, tags: globs } => {
                for (i, t) in tags.iter().filter(|t| matches_any(globs, &t.0)).enumerate() {
                    if i < *count as usize {
                        keep.insert(&t.0);
                    } else {
                        delete.entry(&t.0).or_insert_with(|| r.to_string());
                    }
                }
            }
            RuleAction::DeleteOlder {
                older_than_ms,
                tags: globs,
            } => {
                for t in tags.iter().filter(|t| matches_any(globs, &t.0)) {
                    if t.2 < now.saturating_sub(*older_than_ms) {
                        delete.entry(&t.0).or_insert_with(|| r.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = RepoPlan::default();
    let mut untagging: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &tags {
        let Some(rule) = delete.get(t.0.as_str()) else {
            continue;
        };
        if keep.contains(t.0.as_str()) || kept_digest(&t.1) || locked(&t.0) {
            continue;
        }
        *untagging.entry(t.1.as_str()).or_default() += 1;
        out.tags.push(Deletion {
            repository: repo.to_owned(),
            tag: Some(t.0.clone()),
            digest: t.1.clone(),
            rule: rule.clone(),
            bytes: 0,
        });
    }
    // Manifests this plan leaves without a tag are condemned with the tag that named
    // them; others untagged for long enough by `delete-untagged`.
    let mut tag_count: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &state.tags {
        *tag_count.entry(t.1.as_str()).or_default() += 1;
    }
    let by_digest: BTreeMap<&str, &ManifestState> = state
        .manifests
        .iter()
        .map(|m| (m.digest.as_str(), m))
        .collect();
    for (digest, n) in &untagging {
        if tag_count.get(digest) == Some(n) && by_digest.get(digest).is_some_and(|m| !m.referenced)
        {
            let rule = out
                .tags
                .iter()
                .find(|d| d.digest == *digest)
                .map(|d| d.rule.clone())
                .unwrap_or_default();
            out.condemn.push(Deletion {
                repository: repo.to_owned(),
                tag: None,
                digest: (*digest).to_owned(),
                rule,
                bytes: 0,
            });
        }
    }
    for r in &rules {
        let RuleAction::DeleteUntagged { older_than_ms } = r.action else {
            continue;
        };
        for m in &state.manifests {
            let old = m
                .untagged_at
                .is_some_and(|u| u < now.saturating_sub(older_than_ms));
            if old
                && !m.referenced
                && !m.condemned
                && !kept_digest(&m.digest)
                && !out.condemn.iter().any(|c| c.digest == m.digest)
            {
                out.condemn.push(Deletion {
                    repository: repo.to_owned(),
                    tag: None,
                    digest: m.digest.clone(),
                    rule: r.to_string(),
                    bytes: 0,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn rule(id: i64, repos: &str, action: RuleAction) -> RetentionRule {
        RetentionRule {
            id,
            repositories: repos.into(),
            action,
            source: "cli".into(),
        }
    }

    fn globs(s: &str) -> Vec<String> {
        s.split(',').map(str::to_owned).collect()
    }

    fn state(tags: &[(&str, &str, i64)], untagged: &[(&str, i64)]) -> RepoState {
        let mut manifests: Vec<ManifestState> = Vec::new();
        for (_, d, _) in tags {
            if !manifests.iter().any(|m| m.digest == *d) {
                manifests.push(ManifestState {
                    digest: (*d).into(),
                    ..Default::default()
                });
            }
        }
        for (d, at) in untagged {
            manifests.push(ManifestState {
                digest: (*d).into(),
                untagged_at: Some(*at),
                ..Default::default()
            });
        }
        RepoState {
            tags: tags
                .iter()
                .map(|(t, d, at)| ((*t).into(), (*d).into(), *at))
                .collect(),
            manifests,
        }
    }

    fn deleted(p: &RepoPlan) -> (Vec<String>, Vec<String>) {
        (
            p.tags.iter().map(|d| d.tag.clone().unwrap()).collect(),
            p.condemn.iter().map(|d| d.digest.clone()).collect(),
        )
    }

    #[test]
    fn each_rule_deletes_only_what_it_names() {
        let now = 100 * DAY;
        let s = state(
            &[
                ("v1", "m1", now - 50 * DAY),
                ("main-1", "m2", now - 30 * DAY),
                ("main-2", "m3", now - 20 * DAY),
                ("main-3", "m4", now - 10 * DAY),
                ("pr-1", "m5", now - 9 * DAY),
                ("pr-2", "m6", now - DAY),
                ("latest", "m4", now - 10 * DAY),
            ],
            &[("old", now - 20 * DAY), ("new", now - DAY)],
        );
        let none = HashSet::new();
        let no_lock = |_: &str| false;
        // No rule: nothing.
        assert_eq!(
            plan("team/api", &[], &s, &none, no_lock, now),
            RepoPlan::default()
        );
        // A keep rule alone deletes nothing (unlike a registry that deletes whatever no
        // keep rule names).
        let keep = rule(1, "team/*", RuleAction::Keep { tags: globs("v*") });
        assert_eq!(
            plan(
                "team/api",
                std::slice::from_ref(&keep),
                &s,
                &none,
                no_lock,
                now
            ),
            RepoPlan::default()
        );
        // keep-last: the two newest main-* stay, main-1 goes with its manifest.
        let last = rule(
            2,
            "team/*",
            RuleAction::KeepLast {
                count: 2,
                tags: globs("main-*"),
            },
        );
        let p = plan(
            "team/api",
            std::slice::from_ref(&last),
            &s,
            &none,
            no_lock,
            now,
        );
        assert_eq!(deleted(&p), (vec!["main-1".into()], vec!["m2".into()]));
        assert!(
            p.tags[0].rule.contains("keep-last 2 main-*"),
            "{:?}",
            p.tags[0]
        );
        // delete-older: pr-1 (9 days) goes, pr-2 (1 day) stays.
        let older = rule(
            3,
            "team/*",
            RuleAction::DeleteOlder {
                older_than_ms: 7 * DAY,
                tags: globs("pr-*"),
            },
        );
        let p = plan(
            "team/api",
            std::slice::from_ref(&older),
            &s,
            &none,
            no_lock,
            now,
        );
        assert_eq!(deleted(&p), (vec!["pr-1".into()], vec!["m5".into()]));
        // A tag deleted whose manifest keeps another tag: the manifest is not condemned.
        let all_main = rule(
            4,
            "team/*",
            RuleAction::DeleteOlder {
                older_than_ms: DAY,
                tags: globs("main-*"),
            },
        );
        let p = plan(
            "team/api",
            std::slice::from_ref(&all_main),
            &s,
            &none,
            no_lock,
            now,
        );
        assert_eq!(
            deleted(&p),
            (
                vec!["main-3".into(), "main-2".into(), "main-1".into()],
                vec!["m2".into(), "m3".into()]
            )
        );
        // delete-untagged: only the old untagged one.
        let untagged = rule(
            5,
            "team/*",
            RuleAction::DeleteUntagged {
                older_than_ms: 14 * DAY,
            },
        );
        let p = plan(
            "team/api",
            std::slice::from_ref(&untagged),
            &s,
            &none,
            no_lock,
            now,
        );
        assert_eq!(deleted(&p), (vec![], vec!["old".into()]));
        // Keep rules win over delete rules; so do deployed digests, recent pulls and locks.
        let keep_main3 = rule(
            6,
            "team/api",
            RuleAction::Keep {
                tags: globs("main-3"),
            },
        );
        let p = plan(
            "team/api",
            &[all_main.clone(), keep_main3],
            &s,
            &none,
            no_lock,
            now,
        );
        assert_eq!(deleted(&p).0, vec!["main-2", "main-1"]);
        let deployed: HashSet<String> = ["m3".to_owned()].into();
        let p = plan(
            "team/api",
            std::slice::from_ref(&all_main),
            &s,
            &deployed,
            no_lock,
            now,
        );
        assert_eq!(deleted(&p).0, vec!["main-3", "main-1"]);
        let p = plan(
            "team/api",
            std::slice::from_ref(&all_main),
            &s,
            &none,
            |t| t == "main-1",
            now,
        );
        assert_eq!(deleted(&p).0, vec!["main-3", "main-2"]);
        let mut pulled = s.clone();
        pulled
            .manifests
            .iter_mut()
            .find(|m| m.digest == "m2")
            .unwrap()
            .pulled_at = Some(now - DAY);
        let keep_pulled = rule(
            7,
            "*",
            RuleAction::KeepPulled {
                within_ms: 30 * DAY,
            },
        );
        let p = plan(
            "team/api",
            &[all_main.clone(), keep_pulled],
            &pulled,
            &none,
            no_lock,
            now,
        );
        assert_eq!(deleted(&p).0, vec!["main-3", "main-2"]);
        // A rule of another namespace does nothing here.
        let other = rule(
            8,
            "other/*",
            RuleAction::DeleteOlder {
                older_than_ms: DAY,
                tags: globs("*"),
            },
        );
        assert_eq!(
            plan("team/api", &[other], &s, &none, no_lock, now),
            RepoPlan::default()
        );
        // An untagged manifest an index references is never condemned.
        let mut referenced = s.clone();
        referenced
            .manifests
            .iter_mut()
            .find(|m| m.digest == "old")
            .unwrap()
            .referenced = true;
        let p = plan("team/api", &[untagged], &referenced, &none, no_lock, now);
        assert!(p.condemn.is_empty());
    }

    #[test]
    fn config_rules_and_validation() {
        let c = RuleConfig {
            repositories: "team/*".into(),
            tags: globs("main-*"),
            keep_last: Some(20),
            ..Default::default()
        };
        assert_eq!(
            c.to_rule().unwrap().action,
            RuleAction::KeepLast {
                count: 20,
                tags: globs("main-*")
            }
        );
        let two = RuleConfig {
            keep: Some(globs("v*")),
            ..c.clone()
        };
        assert!(
            two.to_rule()
                .unwrap_err()
                .to_string()
                .contains("exactly one")
        );
        let no_tags = RuleConfig {
            repositories: "x".into(),
            delete_older_than: Some("7d".into()),
            ..Default::default()
        };
        assert!(no_tags.to_rule().unwrap_err().to_string().contains("tags"));
        let bad_age = RuleConfig {
            delete_untagged_older_than: Some("soon".into()),
            repositories: "x".into(),
            ..Default::default()
        };
        assert!(bad_age.to_rule().is_err());
        let zero = RuleConfig {
            keep_last: Some(0),
            ..c
        };
        assert!(
            zero.to_rule()
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        let r = rule(
            3,
            "team/*",
            RuleAction::DeleteOlder {
                older_than_ms: 7 * DAY,
                tags: globs("pr-*"),
            },
        );
        assert_eq!(r.to_string(), "rule 3 (team/*: delete pr-* older than 7d)");
    }
}
