//! The JSON Schema and the README failure table are generated from `FailureReason`; this test
//! fails when the committed copies are stale. Run with `TDC_BLESS=1` to rewrite them.

use to_device_crypto::analytics::schema::{
    failure_table_markdown_with_column, payload_json_schema_text, upstream_schema_proposal_markdown,
};
use to_device_crypto::FailureReason;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TABLE_START: &str = "<!-- failure-table:start (generated from FailureReason; run `TDC_BLESS=1 cargo test --test generated_docs`) -->\n";
const TABLE_END: &str = "<!-- failure-table:end -->";

fn bless() -> bool {
    std::env::var_os("TDC_BLESS").is_some()
}

/// Fails when the committed file at `relative` differs from `expected` (rewrites it when blessing).
fn assert_committed_file_is_fresh(relative: &str, expected: &str) {
    let path = format!("{ROOT}/{relative}");
    if bless() {
        std::fs::write(&path, expected).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == expected,
        "{path} is stale: run `TDC_BLESS=1 cargo test --test generated_docs`"
    );
}

#[test]
fn committed_json_schema_is_fresh() {
    assert_committed_file_is_fresh(
        "schemas/to-device-error-event.schema.json",
        &payload_json_schema_text(),
    );
}

#[test]
fn readme_failure_table_is_fresh() {
    let path = format!("{ROOT}/README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme
        .find(TABLE_START)
        .expect("README has the table start marker")
        + TABLE_START.len();
    let end = readme[start..]
        .find(TABLE_END)
        .expect("README has the table end marker")
        + start;
    // The last column comes from the side-by-side comparison with the patched matrix-sdk-crypto
    // (upstream/sdk-olm/tests/compare.rs writes coverage.json; docs/UPSTREAM.md).
    let coverage_path = format!("{ROOT}/upstream/sdk-olm/coverage.json");
    let coverage: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&coverage_path).unwrap_or_else(|e| panic!("{coverage_path}: {e}")),
    )
    .unwrap();
    let cell = |reason: FailureReason| -> String {
        coverage[reason.analytics_name()]
            .as_str()
            .unwrap_or_else(|| panic!("{coverage_path} has no entry for {reason:?}"))
            .to_owned()
    };
    let expected = failure_table_markdown_with_column(Some(("patched matrix-sdk-crypto", &cell)));
    if bless() && readme[start..end] != expected {
        let updated = format!("{}{}{}", &readme[..start], expected, &readme[end..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        readme[start..end] == expected,
        "the README failure table is stale: run `TDC_BLESS=1 cargo test --test generated_docs`"
    );
}

#[test]
fn committed_upstream_schema_proposal_is_fresh() {
    assert_committed_file_is_fresh(
        "docs/analytics-schema.md",
        &upstream_schema_proposal_markdown(),
    );
}
