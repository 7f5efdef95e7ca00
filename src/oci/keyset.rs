//! Sets of repository names as a few ranges of keys, so that "every repository this
//! caller may pull" is a handful of index range scans rather than a filter over every
//! repository. A pattern is a range: `team/*` is the names from `team/` up to (not
//! including) `team0` (`'0'` follows `'/'`), one repository `a/b` is `[a/b, a/b\0)`,
//! and `*` is everything. Unions, intersections and differences of such sets are again
//! a few ranges.

/// A sorted list of disjoint, non-empty half-open ranges `[from, to)`; `to: None` is
/// unbounded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet(Vec<(String, Option<String>)>);

impl KeySet {
    pub fn empty() -> KeySet {
        KeySet(Vec::new())
    }

    pub fn all() -> KeySet {
        KeySet(vec![(String::new(), None)])
    }

    /// The one key `k`.
    pub fn one(k: &str) -> KeySet {
        KeySet(vec![(k.to_owned(), Some(format!("{k}\0")))])
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &str) -> KeySet {
        // The smallest string above every string that starts with `prefix`: its last
        // byte raised by one (names are ASCII; a prefix of 0x7f bytes has none).
        let mut upper = prefix.as_bytes().to_vec();
        while let Some(last) = upper.pop() {
            if last < 0x7f {
                upper.push(last + 1);
                let to = String::from_utf8(upper).expect("ASCII");
                return KeySet(vec![(prefix.to_owned(), Some(to))]);
            }
        }
        KeySet(vec![(prefix.to_owned(), None)])
    }

    pub fn ranges(&self) -> &[(String, Option<String>)] {
        &self.0
    }

    /// The ranges cut to the keys after `last` (a listing's next page), the empty ones
    /// dropped.
    pub fn ranges_after(&self, last: Option<&str>) -> Vec<(String, Option<String>)> {
        let after = last.map(|l| format!("{l}\0"));
        self.0
            .iter()
            .filter_map(|(from, to)| {
                let from = match &after {
                    Some(a) if a > from => a.clone(),
                    _ => from.clone(),
                };
                to.as_ref()
                    .is_none_or(|t| from < *t)
                    .then(|| (from, to.clone()))
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, k: &str) -> bool {
        self.0
            .iter()
            .any(|(from, to)| from.as_str() <= k && to.as_deref().is_none_or(|t| k < t))
    }

    fn combine(&self, other: &KeySet, keep: impl Fn(bool, bool) -> bool) -> KeySet {
        // Membership is constant between consecutive boundaries: decide each segment by
        // its first key.
        let mut points: Vec<&str> = vec![""];
        for (from, to) in self.0.iter().chain(&other.0) {
            points.push(from);
            if let Some(t) = to {
                points.push(t);
            }
        }
        points.sort_unstable();
        points.dedup();
        let mut out: Vec<(String, Option<String>)> = Vec::new();
        for (i, p) in points.iter().enumerate() {
            if !keep(self.contains(p), other.contains(p)) {
                continue;
            }
            let to = points.get(i + 1).map(|t| (*t).to_owned());
            match out.last_mut() {
                Some((_, last_to)) if last_to.as_deref() == Some(*p) => *last_to = to,
                _ => out.push(((*p).to_owned(), to)),
            }
        }
        KeySet(out)
    }

    pub fn union(&self, other: &KeySet) -> KeySet {
        self.combine(other, |a, b| a || b)
    }

    pub fn intersect(&self, other: &KeySet) -> KeySet {
        self.combine(other, |a, b| a && b)
    }

    pub fn minus(&self, other: &KeySet) -> KeySet {
        self.combine(other, |a, b| a && !b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_of_patterns() {
        let team = KeySet::prefix("team/");
        assert!(team.contains("team/api") && team.contains("team/a/b"));
        assert!(!team.contains("team") && !team.contains("teamx/api") && !team.contains("tea"));
        let one = KeySet::one("team/api");
        assert!(one.contains("team/api") && !one.contains("team/api/x"));
        let s = team.minus(&one);
        assert!(!s.contains("team/api") && s.contains("team/api/x") && s.contains("team/b"));
        assert_eq!(s.ranges().len(), 2);
        assert!(KeySet::all().contains("") && KeySet::all().contains("zzz"));
        assert!(team.intersect(&KeySet::prefix("other/")).is_empty());
        assert_eq!(team.union(&team), team);
    }

    fn small_set() -> impl Strategy<Value = KeySet> {
        let piece = prop_oneof![
            "[ab]{0,3}".prop_map(|p| KeySet::prefix(&p)),
            "[ab/]{1,3}".prop_map(|k| KeySet::one(&k)),
            Just(KeySet::all()),
            Just(KeySet::empty()),
        ];
        proptest::collection::vec((piece, 0u8..3), 0..5).prop_map(|ops| {
            ops.into_iter()
                .fold(KeySet::empty(), |acc, (s, op)| match op {
                    0 => acc.union(&s),
                    1 => acc.minus(&s),
                    _ => acc.intersect(&s),
                })
        })
    }

    proptest! {
        #[test]
        fn operations_agree_with_membership(a in small_set(), b in small_set(), k in "[ab/]{0,4}") {
            prop_assert_eq!(a.union(&b).contains(&k), a.contains(&k) || b.contains(&k));
            prop_assert_eq!(a.intersect(&b).contains(&k), a.contains(&k) && b.contains(&k));
            prop_assert_eq!(a.minus(&b).contains(&k), a.contains(&k) && !b.contains(&k));
            // Ranges stay sorted, disjoint and non-empty.
            for w in a.union(&b).ranges().windows(2) {
                prop_assert!(w[0].1.as_deref().is_some_and(|t| t < w[1].0.as_str()));
            }
        }
    }
}
