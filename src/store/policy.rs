//! Tag immutability: a policy names repositories (a pattern, as grants use) and tag globs;
//! an existing tag it matches can be neither moved to another manifest nor deleted.
//!
//! The metadata backend checks policies inside the transaction that would move or delete
//! a tag, so two racing pushes cannot both set a protected tag.

use std::fmt;

use crate::auth::Pattern;

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPolicy {
    pub id: i64,
    pub repositories: String,
    /// Tag globs: `*` any run of characters, `?` one character, `[0-9]` / `[!a-z]` a class.
    pub tags: Vec<String>,
    pub created_at: i64,
    pub created_by: Option<String>,
}

impl TagPolicy {
    /// Whether this policy protects `tag` of `repo`.
    pub fn locks(&self, repo: &str, tag: &str) -> bool {
        Pattern::parse(&self.repositories).is_ok_and(|p| p.matches(repo))
            && self
                .tags
                .iter()
                .any(|g| glob_match(g.as_bytes(), tag.as_bytes()))
    }
}

impl fmt::Display for TagPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "immutable-tags policy {} ({} tags {})",
            self.id,
            self.repositories,
            self.tags.join(",")
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(transparent)]
    Pattern(#[from] crate::auth::scope::PatternError),
    #[error("invalid tag pattern {0:?}: use characters of a tag with `*`, `?` and `[...]`")]
    Glob(String),
    #[error("give at least one tag pattern, e.g. --tags 'v*,[0-9]*'")]
    NoTags,
}

/// Parses `--tags 'v*,[0-9]*'` into globs, each checked.
pub fn parse_tag_globs(s: &str) -> Result<Vec<String>, PolicyError> {
    let globs: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    if globs.is_empty() {
        return Err(PolicyError::NoTags);
    }
    for g in &globs {
        if !valid_glob(g) {
            return Err(PolicyError::Glob(g.clone()));
        }
    }
    Ok(globs)
}

fn valid_glob(g: &str) -> bool {
    if g.len() > 256 {
        return false;
    }
    let b = g.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'[' => match class_end(b, i) {
                Some(end) => i = end,
                None => return false,
            },
            b'*' | b'?' | b'.' | b'_' | b'-' => {}
            c if c.is_ascii_alphanumeric() => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// The index of the `]` closing the class that opens at `start`.
fn class_end(p: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if p.get(i) == Some(&b'!') {
        i += 1;
    }
    // A `]` right after the opening is a member, not the end.
    if p.get(i) == Some(&b']') {
        i += 1;
    }
    while i < p.len() {
        if p[i] == b']' {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether `c` is in the class `p[start..=end]` (`[abc]`, `[a-z]`, `[!0-9]`).
fn class_has(p: &[u8], start: usize, end: usize, c: u8) -> bool {
    let mut i = start + 1;
    let negate = p[i] == b'!';
    if negate {
        i += 1;
    }
    let mut found = false;
    while i < end {
        if i + 2 < end && p[i + 1] == b'-' {
            found |= (p[i]..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            found |= p[i] == c;
            i += 1;
        }
    }
    found != negate
}

/// Glob matching over bytes, iterative with one backtrack point (linear for `*` runs).
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        let step = match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
                continue;
            }
            Some(b'?') => Some(pi + 1),
            Some(b'[') => class_end(p, pi)
                .filter(|&end| class_has(p, pi, end, s[si]))
                .map(|end| end + 1),
            Some(&c) if c == s[si] => Some(pi + 1),
            _ => None,
        };
        match (step, star) {
            (Some(next), _) => {
                pi = next;
                si += 1;
            }
            (None, Some((sp, ss))) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        glob_match(p.as_bytes(), s.as_bytes())
    }

    #[test]
    fn globs() {
        assert!(m("v*", "v1.0.0"));
        assert!(!m("v*", "latest"));
        assert!(m("[0-9]*", "1.0.0"));
        assert!(m("[0-9]*", "1"));
        assert!(!m("[0-9]*", "prod"));
        assert!(!m("[0-9]*", ""));
        assert!(m("*", ""));
        assert!(m("1.?.*", "1.2.3"));
        assert!(!m("1.?.*", "1.22.3"));
        assert!(m("[!a-z]*", "9x"));
        assert!(!m("[!a-z]*", "x9"));
        assert!(m("*-rc*", "1.3.0-rc.1"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("release-[ab]", "release-b"));
        assert!(!m("exact", "exactly"));
    }

    #[test]
    fn parsing() {
        assert_eq!(
            parse_tag_globs("v*, [0-9]*").unwrap(),
            vec!["v*".to_owned(), "[0-9]*".to_owned()]
        );
        assert_eq!(parse_tag_globs(" , "), Err(PolicyError::NoTags));
        assert!(matches!(parse_tag_globs("v/*"), Err(PolicyError::Glob(_))));
        assert!(matches!(parse_tag_globs("[0-9"), Err(PolicyError::Glob(_))));
    }

    #[test]
    fn locks_only_matching_repositories_and_tags() {
        let p = TagPolicy {
            id: 1,
            repositories: "team/*".into(),
            tags: vec!["v*".into(), "[0-9]*".into()],
            created_at: 0,
            created_by: None,
        };
        assert!(p.locks("team/api", "1.0.0"));
        assert!(p.locks("team/api", "v1.0.0"));
        assert!(!p.locks("team/api", "prod"));
        assert!(!p.locks("team/api", "latest"));
        assert!(!p.locks("other/api", "1.0.0"));
        assert!(!p.locks("team", "1.0.0"));
        assert_eq!(
            p.to_string(),
            "immutable-tags policy 1 (team/* tags v*,[0-9]*)"
        );
    }
}
