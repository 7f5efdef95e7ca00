//! Names, references and digests on arbitrary text: parsing never panics, and whatever
//! parses prints back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::oci::{Digest, Reference, RepoName};

fuzz_target!(|s: &str| {
    if let Ok(n) = RepoName::parse(s) {
        assert_eq!(n.as_str(), s);
        assert!(!s.contains(".."));
    }
    if let Ok(r) = Reference::parse(s) {
        match r {
            Reference::Tag(t) => assert_eq!(t, s),
            Reference::Digest(d) => assert_eq!(d.as_str(), s),
        }
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
    }
});
