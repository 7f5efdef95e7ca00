use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{OCI_MANIFEST, TestRegistry, error_of, header, image_manifest};

async fn tagged(reg: &TestRegistry, repo: &str, tags: &[&str]) {
    let c = reg.push_blob(repo, b"cfg").await;
    let m = image_manifest((&c, 3), &[]);
    for t in tags {
        assert_eq!(
            reg.put_manifest(repo, t, OCI_MANIFEST, &m).await.status(),
            StatusCode::CREATED
        );
    }
}

#[tokio::test]
async fn tags_list_sorted_and_paginated_with_link() {
    let reg = TestRegistry::start();
    tagged(
        &reg,
        "team/api",
        &["v2", "latest", "B", "a", "1.0", "v10", "prod"],
    )
    .await;
    let all: Value = reg
        .get("/v2/team/api/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        all,
        json!({"name": "team/api", "tags": ["1.0", "B", "a", "latest", "prod", "v10", "v2"]})
    );

    let r = reg.get("/v2/team/api/tags/list?n=3").await;
    assert_eq!(
        header(&r, "link"),
        Some("</v2/team/api/tags/list?n=3&last=a>; rel=\"next\"")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["tags"],
        json!(["1.0", "B", "a"])
    );
    let r = reg.get("/v2/team/api/tags/list?n=3&last=a").await;
    assert_eq!(
        header(&r, "link"),
        Some("</v2/team/api/tags/list?n=3&last=v10>; rel=\"next\"")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["tags"],
        json!(["latest", "prod", "v10"])
    );
    let r = reg.get("/v2/team/api/tags/list?n=3&last=v10").await;
    assert_eq!(header(&r, "link"), None);
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!(["v2"]));
    // Exactly n when n remain: no Link.
    let r = reg.get("/v2/team/api/tags/list?n=7").await;
    assert_eq!(header(&r, "link"), None);
    // n=0: empty, no Link. last without n: everything after it (not necessarily a tag).
    let r = reg.get("/v2/team/api/tags/list?n=0").await;
    assert_eq!(header(&r, "link"), None);
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!([]));
    let r = reg.get("/v2/team/api/tags/list?last=p").await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["tags"],
        json!(["prod", "v10", "v2"])
    );

    for bad in ["-1", "x", "1.5"] {
        let (s, code) = error_of(reg.get(&format!("/v2/team/api/tags/list?n={bad}")).await).await;
        assert_eq!(
            (s, code.as_str()),
            (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID"),
            "{bad}"
        );
    }
    let (s, code) = error_of(reg.get("/v2/nobody/here/tags/list").await).await;
    assert_eq!((s, code.as_str()), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
}

#[tokio::test]
async fn catalog_sorted_and_paginated() {
    let reg = TestRegistry::start();
    for repo in ["zeta", "alpha/one", "alpha", "mid/x/y"] {
        reg.push_image(repo, "v1", repo).await;
    }
    // A repository holding only blobs (a push under way) is not in the catalog.
    reg.push_blob("blobs/only", b"x").await;
    let all: Value = reg.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(
        all,
        json!({"repositories": ["alpha", "alpha/one", "mid/x/y", "zeta"]})
    );
    let r = reg.get("/v2/_catalog?n=2").await;
    assert_eq!(
        header(&r, "link"),
        Some("</v2/_catalog?n=2&last=alpha%2Fone>; rel=\"next\"")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["repositories"],
        json!(["alpha", "alpha/one"])
    );
    let r = reg.get("/v2/_catalog?n=2&last=alpha%2Fone").await;
    assert_eq!(header(&r, "link"), None);
    assert_eq!(
        r.json::<Value>().await.unwrap()["repositories"],
        json!(["mid/x/y", "zeta"])
    );
}
