//! Permission vocabulary: actions, levels, repository patterns and token scopes.

use std::fmt;

use crate::oci::RepoName;

/// What a request does to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// A set of actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const ALL: Actions = Actions(0b111);

    fn bit(a: Action) -> u8 {
        match a {
            Action::Pull => 1,
            Action::Push => 2,
            Action::Delete => 4,
        }
    }

    pub fn of(actions: &[Action]) -> Actions {
        Actions(actions.iter().fold(0, |acc, a| acc | Actions::bit(*a)))
    }

    pub fn has(self, a: Action) -> bool {
        self.0 & Actions::bit(a) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, o: Actions) -> Actions {
        Actions(self.0 | o.0)
    }

    pub fn intersect(self, o: Actions) -> Actions {
        Actions(self.0 & o.0)
    }

    pub fn contains(self, o: Actions) -> bool {
        self.0 & o.0 == o.0
    }

    pub fn list(self) -> Vec<Action> {
        [Action::Pull, Action::Push, Action::Delete]
            .into_iter()
            .filter(|a| self.has(*a))
            .collect()
    }

    /// Parses `pull,push` (or `*` for every action).
    pub fn parse(s: &str) -> Option<Actions> {
        if s == "*" {
            return Some(Actions::ALL);
        }
        s.split(',')
            .map(|a| Action::parse(a.trim()))
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
            .map(|v| Actions::of(&v))
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.list().into_iter().map(Action::name).collect();
        f.write_str(&names.join(","))
    }
}

/// A permission level granted on a pattern; each includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Pull,
    Push,
    Delete,
    Admin,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "pull" => Some(Level::Pull),
            "push" => Some(Level::Push),
            "delete" => Some(Level::Delete),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Pull => "pull",
            Level::Push => "push",
            Level::Delete => "delete",
            Level::Admin => "admin",
        }
    }

    pub fn actions(self) -> Actions {
        match self {
            Level::Pull => Actions::of(&[Action::Pull]),
            Level::Push => Actions::of(&[Action::Pull, Action::Push]),
            Level::Delete | Level::Admin => Actions::ALL,
        }
    }
}

/// A repository pattern: one repository (`team/api`), a namespace and everything below
/// it (`team/*`), or every repository (`*`). Matching is on validated names only, so
/// `team/*` can never reach `team`, `other/x` or `Team/x`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    All,
    Namespace(String),
    Exact(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid repository pattern {0:?}: use a repository name, `namespace/*` or `*`")]
pub struct PatternError(pub String);

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, PatternError> {
        if s == "*" {
            return Ok(Pattern::All);
        }
        let (name, ns) = match s.strip_suffix("/*") {
            Some(n) => (n, true),
            None => (s, false),
        };
        RepoName::parse(name).map_err(|_| PatternError(s.to_owned()))?;
        Ok(if ns {
            Pattern::Namespace(name.to_owned())
        } else {
            Pattern::Exact(name.to_owned())
        })
    }

    pub fn matches(&self, repo: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Exact(n) => n == repo,
            Pattern::Namespace(ns) => {
                repo.len() > ns.len() + 1
                    && repo.starts_with(ns.as_str())
                    && repo.as_bytes()[ns.len()] == b'/'
            }
        }
    }

    /// Whether every repository `other` matches is matched by `self`.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::All, _) => true,
            (_, Pattern::All) => false,
            (Pattern::Exact(a), Pattern::Exact(b)) => a == b,
            (Pattern::Exact(_), Pattern::Namespace(_)) => false,
            (Pattern::Namespace(_), Pattern::Exact(b)) => self.matches(b),
            (Pattern::Namespace(a), Pattern::Namespace(b)) => a == b || self.matches(b),
        }
    }

    /// The repository names the pattern matches, as key ranges.
    pub fn keys(&self) -> crate::oci::keyset::KeySet {
        use crate::oci::keyset::KeySet;
        match self {
            Pattern::All => KeySet::all(),
            Pattern::Exact(n) => KeySet::one(n),
            Pattern::Namespace(ns) => KeySet::prefix(&format!("{ns}/")),
        }
    }

    /// How specific the pattern is; the most specific visibility rule wins.
    pub fn specificity(&self) -> usize {
        match self {
            Pattern::All => 0,
            Pattern::Namespace(n) => 1 + 2 * n.len(),
            Pattern::Exact(n) => 2 + 2 * n.len(),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::All => f.write_str("*"),
            Pattern::Namespace(n) => write!(f, "{n}/*"),
            Pattern::Exact(n) => f.write_str(n),
        }
    }
}

/// A token scope: `repository:<pattern>:<actions>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub pattern: Pattern,
    pub actions: Actions,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid scope {0:?}: expected repository:<name, namespace/* or *>:<pull,push,delete>")]
pub struct ScopeError(pub String);

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let err = || ScopeError(s.to_owned());
        let rest = s.strip_prefix("repository:").ok_or_else(err)?;
        let (pattern, actions) = rest.rsplit_once(':').ok_or_else(err)?;
        Ok(Scope {
            pattern: Pattern::parse(pattern).map_err(|_| err())?,
            actions: Actions::parse(actions).ok_or_else(err)?,
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "repository:{}:{}", self.pattern, self.actions)
    }
}

/// A scope a client asks the token endpoint for: `repository:<name>:<actions>`, where
/// unknown actions are ignored (clients ask for `*` or `pull,push`), or the registry's
/// catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    Repository { name: RepoName, actions: Actions },
    Catalog,
}

impl Requested {
    /// Parses one requested scope; None if it names nothing this registry knows.
    pub fn parse(s: &str) -> Option<Requested> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        match kind {
            "registry" if name == "catalog" => Some(Requested::Catalog),
            "repository" | "repository(plugin)" => {
                let name = RepoName::parse(name).ok()?;
                let actions = if actions == "*" {
                    Actions::ALL
                } else {
                    Actions::of(
                        &actions
                            .split(',')
                            .filter_map(Action::parse)
                            .collect::<Vec<_>>(),
                    )
                };
                Some(Requested::Repository { name, actions })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_only_validated_names_below_them() {
        let team = Pattern::parse("team/*").unwrap();
        for yes in ["team/api", "team/a/b"] {
            assert!(team.matches(yes), "{yes}");
        }
        for no in [
            "team",
            "teamx/api",
            "other/api",
            "Team/api",
            "team/",
            "tea/m",
            "other/team/api",
        ] {
            assert!(!team.matches(no), "{no}");
        }
        assert!(Pattern::parse("team/api").unwrap().matches("team/api"));
        assert!(!Pattern::parse("team/api").unwrap().matches("team/api/x"));
        assert!(Pattern::All.matches("anything/at/all"));
        for bad in [
            "team/../*",
            "Team/*",
            "team/*/x",
            "team.*",
            "team/**",
            "",
            "/*",
            "team%2F*",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pattern_cover() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("*").covers(&p("team/*")));
        assert!(p("team/*").covers(&p("team/api")));
        assert!(p("team/*").covers(&p("team/sub/*")));
        assert!(p("team/*").covers(&p("team/*")));
        assert!(!p("team/*").covers(&p("team")));
        assert!(!p("team/api").covers(&p("team/*")));
        assert!(!p("team/*").covers(&p("*")));
    }

    #[test]
    fn scopes() {
        let s = Scope::parse("repository:team/*:pull,push").unwrap();
        assert_eq!(s.pattern, Pattern::Namespace("team".into()));
        assert_eq!(s.actions, Actions::of(&[Action::Pull, Action::Push]));
        assert_eq!(s.to_string(), "repository:team/*:pull,push");
        for bad in [
            "team/*:pull",
            "repository:team/*",
            "repository:team/*:fly",
            "repository:Team:pull",
            "repository:t:",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Level::Push.actions(),
            Actions::of(&[Action::Pull, Action::Push])
        );
        assert!(Level::Admin.actions().contains(Actions::ALL));
    }

    #[test]
    fn requested_scopes() {
        assert_eq!(
            Requested::parse("repository:team/api:pull,push"),
            Some(Requested::Repository {
                name: RepoName::parse("team/api").unwrap(),
                actions: Actions::of(&[Action::Pull, Action::Push])
            })
        );
        assert_eq!(
            Requested::parse("registry:catalog:*"),
            Some(Requested::Catalog)
        );
        assert_eq!(Requested::parse("repository:team/../x:pull"), None);
        assert_eq!(Requested::parse("garbage"), None);
    }
}
