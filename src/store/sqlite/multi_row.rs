//! Multi-row statements: a batch's many small rows (replay keys, outbox rows, acknowledged ids)
//! go to SQLite in a few statements of up to 64 rows each instead of one statement per row.

use rusqlite::types::ToSqlOutput;
use rusqlite::{params_from_iter, CachedStatement, Connection};

use crate::error::StoreError;

/// Rows per statement, largest first. A count is split into these (100 = 64 + 32 + 4), so a batch
/// runs at most one statement of each size and every size keeps one cached statement text.
const SIZES: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];

/// The text of one statement: `head`, then `rows` copies of `group` separated by commas, then
/// `tail` (e.g. `INSERT … VALUES` + `(?, ?)` × rows, or `DELETE … IN (` + `?` × rows + `)`).
fn statement_text(head: &str, group: &str, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * (group.len() + 1));
    sql.push_str(head);
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push_str(group);
    }
    sql.push_str(tail);
    sql
}

/// Splits `items` into chunks of [`SIZES`], in order.
fn chunks<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let size = *SIZES.iter().find(|&&size| size <= items.len())?;
        let (chunk, rest) = items.split_at(size);
        items = rest;
        Some(chunk)
    })
}

/// Prepares (through the statement cache) the statement for each chunk of `items`, binds the
/// chunk's parameters (`bind` gives one item's, as many as `group` has placeholders) and hands
/// both to `run`.
fn for_each_statement<'a, T>(
    connection: &Connection,
    head: &str,
    group: &str,
    tail: &str,
    items: &'a [T],
    bind: impl Fn(&'a T, &mut Vec<ToSqlOutput<'a>>),
    mut run: impl FnMut(&mut CachedStatement<'_>, &[ToSqlOutput<'a>]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut parameters = Vec::new();
    for chunk in chunks(items) {
        parameters.clear();
        for item in chunk {
            bind(item, &mut parameters);
        }
        let mut statement =
            connection.prepare_cached(&statement_text(head, group, chunk.len(), tail))?;
        run(&mut statement, &parameters)?;
    }
    Ok(())
}

/// Executes `head group,group,… tail` over `items` (`bind` gives one item's parameters, as many as
/// `group` has placeholders) and returns how many rows changed in all.
pub(super) fn execute<'a, T>(
    connection: &Connection,
    head: &str,
    group: &str,
    tail: &str,
    items: &'a [T],
    bind: impl Fn(&'a T, &mut Vec<ToSqlOutput<'a>>),
) -> Result<usize, StoreError> {
    let mut changed = 0;
    for_each_statement(
        connection,
        head,
        group,
        tail,
        items,
        bind,
        |statement, parameters| {
            changed += statement.execute(params_from_iter(parameters.iter()))?;
            Ok(())
        },
    )?;
    Ok(changed)
}

/// Like [`execute`] for a statement that returns one integer column per affected row (`DELETE …
/// RETURNING x`): calls `each` with every value returned.
pub(super) fn query_integers<'a, T>(
    connection: &Connection,
    head: &str,
    group: &str,
    tail: &str,
    items: &'a [T],
    bind: impl Fn(&'a T, &mut Vec<ToSqlOutput<'a>>),
    mut each: impl FnMut(Option<i64>),
) -> Result<(), StoreError> {
    for_each_statement(
        connection,
        head,
        group,
        tail,
        items,
        bind,
        |statement, parameters| {
            let mut rows = statement.query(params_from_iter(parameters.iter()))?;
            while let Some(row) = rows.next()? {
                each(row.get(0)?);
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_split_into_the_fixed_sizes_in_order() {
        let items: Vec<usize> = (0..127).collect();
        let sizes: Vec<usize> = chunks(&items[..100]).map(<[usize]>::len).collect();
        assert_eq!(sizes, [64, 32, 4]);
        let rejoined: Vec<usize> = chunks(&items).flatten().copied().collect();
        assert_eq!(rejoined, items);
        assert_eq!(chunks::<u8>(&[]).count(), 0);
        assert_eq!(
            chunks(&items[..127])
                .map(<[usize]>::len)
                .collect::<Vec<_>>(),
            [64, 32, 16, 8, 4, 2, 1]
        );
    }

    #[test]
    fn every_row_is_written_and_counted_once() {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        let rows: Vec<(i64, String)> = (0..203).map(|i| (i % 200, format!("v{i}"))).collect();
        let inserted = execute(
            &connection,
            "INSERT OR IGNORE INTO t (k, v) VALUES ",
            "(?, ?)",
            "",
            &rows,
            |(k, v), out| {
                out.push(ToSqlOutput::from(*k));
                out.push(ToSqlOutput::from(v.as_str()));
            },
        )
        .unwrap();
        // Keys 0..2 come twice: the first one stays, as with one statement per row.
        assert_eq!(inserted, 200);
        let first: String = connection
            .query_row("SELECT v FROM t WHERE k = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(first, "v1");
        let mut deleted = Vec::new();
        let keys: Vec<i64> = (150..260).collect();
        query_integers(
            &connection,
            "DELETE FROM t WHERE k IN (",
            "?",
            ") RETURNING k",
            &keys,
            |k, out| out.push(ToSqlOutput::from(*k)),
            |k| deleted.push(k.unwrap()),
        )
        .unwrap();
        deleted.sort_unstable();
        assert_eq!(deleted, (150..200).collect::<Vec<_>>());
    }
}
