//! `/v2/...` paths, parsed once into a typed endpoint. Repository names contain `/`, so
//! the endpoint is recognised by the path's last segments.

/// What a `/v2/` path addresses. Strings are raw (not yet validated) path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Base,
    Catalog,
    Tags { name: &'a str },
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    UploadStart { name: &'a str },
    Upload { name: &'a str, id: &'a str },
    Referrers { name: &'a str, digest: &'a str },
}

/// Parses the part of the path after `/v2/`. None if it names no endpoint.
pub fn parse(rest: &str) -> Option<Endpoint<'_>> {
    if rest.is_empty() {
        return Some(Endpoint::Base);
    }
    if rest == "_catalog" {
        return Some(Endpoint::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return nonempty(name).map(|name| Endpoint::Tags { name });
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return nonempty(name).map(|name| Endpoint::UploadStart { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    if last.is_empty() {
        return None;
    }
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        return nonempty(name).map(|name| Endpoint::Upload { name, id: last });
    }
    let (name, kind) = head.rsplit_once('/')?;
    let name = nonempty(name)?;
    match kind {
        "manifests" => Some(Endpoint::Manifest {
            name,
            reference: last,
        }),
        "blobs" => Some(Endpoint::Blob { name, digest: last }),
        "referrers" => Some(Endpoint::Referrers { name, digest: last }),
        _ => None,
    }
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        use Endpoint::*;
        assert_eq!(parse(""), Some(Base));
        assert_eq!(parse("_catalog"), Some(Catalog));
        assert_eq!(parse("a/b/tags/list"), Some(Tags { name: "a/b" }));
        assert_eq!(
            parse("a/manifests/latest"),
            Some(Manifest {
                name: "a",
                reference: "latest"
            })
        );
        assert_eq!(
            parse("x/manifests/y/manifests/sha256:00"),
            Some(Manifest {
                name: "x/manifests/y",
                reference: "sha256:00"
            })
        );
        assert_eq!(
            parse("a/b/c/blobs/sha256:00"),
            Some(Blob {
                name: "a/b/c",
                digest: "sha256:00"
            })
        );
        assert_eq!(parse("a/blobs/uploads/"), Some(UploadStart { name: "a" }));
        assert_eq!(parse("a/blobs/uploads"), Some(UploadStart { name: "a" }));
        assert_eq!(
            parse("a/blobs/uploads/123-abc"),
            Some(Upload {
                name: "a",
                id: "123-abc"
            })
        );
        assert_eq!(
            parse("blobs/uploads/blobs/uploads/x"),
            Some(Upload {
                name: "blobs/uploads",
                id: "x"
            })
        );
        assert_eq!(
            parse("a/referrers/sha256:00"),
            Some(Referrers {
                name: "a",
                digest: "sha256:00"
            })
        );
        for none in [
            "a",
            "a/",
            "manifests/x",
            "/manifests/x",
            "a/manifests/",
            "a/tags",
            "a/other/x",
            "tags/list",
        ] {
            assert_eq!(parse(none), None, "{none:?}");
        }
    }
}
