//! Diffs between revisions of a VCL template.

use std::time::Duration;

use vaas_proto::v1::DiffVclTemplateRevisionsRequest;
use vaas_store::Store;

use crate::error::ApiError;

/// Longest a diff may compute before it gives up on a minimal result; beyond it the diff is
/// still correct, only coarser.
const DIFF_DEADLINE: Duration = Duration::from_millis(500);

/// Returns the unified diff from `from_revision` to `to_revision` (empty when equal). Diffing up
/// to two 1 MiB templates is CPU work, so it runs off the async threads.
pub async fn diff(
    store: &Store,
    request: &DiffVclTemplateRevisionsRequest,
) -> Result<String, ApiError> {
    let from = store
        .get_template_revision(request.template_id, request.from_revision)
        .await?;
    let to = store
        .get_template_revision(request.template_id, request.to_revision)
        .await?;
    let (from_number, to_number) = (from.revision, to.revision);
    tokio::task::spawn_blocking(move || {
        unified_diff(&from.content, &to.content, from_number, to_number)
    })
    .await
    .map_err(|_| ApiError::DiffTooLarge {
        from: from_number,
        to: to_number,
    })
}

/// Returns the unified diff of two texts, with headers naming the revisions.
pub fn unified_diff(from: &str, to: &str, from_revision: i64, to_revision: i64) -> String {
    if from == to {
        return String::new();
    }
    similar::TextDiff::configure()
        .timeout(DIFF_DEADLINE)
        .diff_lines(from, to)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("revision {from_revision}"),
            &format!("revision {to_revision}"),
        )
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_shows_removed_and_added_lines_with_revision_headers() {
        let diff = unified_diff("a\nb\nc\n", "a\nB\nc\n", 1, 2);
        assert_eq!(
            diff,
            "--- revision 1\n+++ revision 2\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n"
        );
        assert_eq!(unified_diff("same", "same", 1, 2), "");
    }
}
