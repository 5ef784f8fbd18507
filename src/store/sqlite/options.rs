//! Open settings that make the store fail the way a real one does, for the `testing` feature's
//! [`SqliteStore::open_with_options`](super::SqliteStore::open_with_options): a read-only file, a
//! short busy timeout, a page limit. [`SqliteStore::open`](super::SqliteStore::open) uses the
//! defaults.

use std::time::Duration;

/// Test-only settings for [`SqliteStore::open_with_options`](super::SqliteStore::open_with_options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SqliteTestOptions {
    /// Open the file with `SQLITE_OPEN_READ_ONLY`: every write fails with SQLITE_READONLY.
    pub read_only: bool,
    /// How long a write waits for another connection's write lock before failing with
    /// SQLITE_BUSY (default 10 s).
    pub busy_timeout: Option<Duration>,
    /// `PRAGMA max_page_count`: this connection cannot grow the file beyond that many pages and
    /// fails with SQLITE_FULL instead, as on a full disk.
    pub max_page_count: Option<u64>,
}
