//! The SQLite outbox's unit of storage: every decrypted result of one committed batch, framed into
//! one value so that the store seals it once per batch instead of once per result (the AEAD's
//! fixed cost per call was as large as sealing the ~800 bytes of a result).
//!
//! Framing (schema 5), repeated per result, little-endian: `u32` id length, id, `u64` batch,
//! `u64` index, `u32` JSON length, JSON. The batch and index travel inside the sealed value, so
//! the order in which results are delivered is authenticated: the store checks them against the
//! plain `pending_results` columns it sorts and looks up by. Schema 4 framed results without the
//! batch ([`decode_v4`], read only by the migration). Only the store writes either, but they are
//! read back defensively: anything that does not frame exactly is reported as corruption, never
//! a panic.

use crate::error::StoreError;

/// One result inside a batch value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FramedResult<'a> {
    pub id: &'a str,
    pub batch: u64,
    pub index: u64,
    pub json: &'a str,
}

/// Frames `results` into one value.
pub(crate) fn encode<'a>(results: impl IntoIterator<Item = FramedResult<'a>>) -> Vec<u8> {
    let mut out = Vec::new();
    for result in results {
        out.reserve(24 + result.id.len() + result.json.len());
        out.extend_from_slice(&length(result.id).to_le_bytes());
        out.extend_from_slice(result.id.as_bytes());
        out.extend_from_slice(&result.batch.to_le_bytes());
        out.extend_from_slice(&result.index.to_le_bytes());
        out.extend_from_slice(&length(result.json).to_le_bytes());
        out.extend_from_slice(result.json.as_bytes());
    }
    out
}

fn length(text: &str) -> u32 {
    // A result is one to-device event's plaintext (events are capped at 256 KiB).
    u32::try_from(text.len()).expect("a result is far smaller than 4 GiB")
}

/// Reads back what [`encode`] wrote.
pub(crate) fn decode(mut bytes: &[u8]) -> Result<Vec<FramedResult<'_>>, StoreError> {
    let mut results = Vec::new();
    while !bytes.is_empty() {
        let id = take_text(&mut bytes)?;
        let batch = u64::from_le_bytes(take_array(&mut bytes)?);
        let index = u64::from_le_bytes(take_array(&mut bytes)?);
        let json = take_text(&mut bytes)?;
        results.push(FramedResult {
            id,
            batch,
            index,
            json,
        });
    }
    Ok(results)
}

/// Reads a schema-4 value (no batch inside: it is `batch`, the column of its row); for the
/// migration to schema 5 only.
pub(crate) fn decode_v4(mut bytes: &[u8], batch: u64) -> Result<Vec<FramedResult<'_>>, StoreError> {
    let mut results = Vec::new();
    while !bytes.is_empty() {
        let id = take_text(&mut bytes)?;
        let index = u64::from_le_bytes(take_array(&mut bytes)?);
        let json = take_text(&mut bytes)?;
        results.push(FramedResult {
            id,
            batch,
            index,
            json,
        });
    }
    Ok(results)
}

fn corrupted(detail: &str) -> StoreError {
    StoreError::Corrupted {
        what: "decrypted results",
        detail: detail.to_owned(),
    }
}

fn take_array<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N], StoreError> {
    let (head, rest) = bytes
        .split_first_chunk::<N>()
        .ok_or_else(|| corrupted("the framing is truncated"))?;
    *bytes = rest;
    Ok(*head)
}

fn take_text<'a>(bytes: &mut &'a [u8]) -> Result<&'a str, StoreError> {
    let length = u32::from_le_bytes(take_array(bytes)?) as usize;
    if bytes.len() < length {
        return Err(corrupted("a length runs past the end"));
    }
    let (text, rest) = bytes.split_at(length);
    *bytes = rest;
    std::str::from_utf8(text).map_err(|_| corrupted("a result is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn round_trips(results in proptest::collection::vec((".{0,20}", any::<u64>(), any::<u64>(), ".{0,40}"), 0..8)) {
            let framed: Vec<FramedResult<'_>> = results
                .iter()
                .map(|(id, batch, index, json)| FramedResult { id, batch: *batch, index: *index, json })
                .collect();
            let encoded = encode(results.iter().map(|(id, batch, index, json)| FramedResult { id, batch: *batch, index: *index, json }));
            prop_assert_eq!(decode(&encoded).unwrap(), framed);
        }

        #[test]
        fn damaged_input_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn truncation_is_reported() {
        let framed = encode([FramedResult {
            id: "id",
            batch: 7,
            index: 3,
            json: "{}",
        }]);
        for cut in 1..framed.len() {
            assert!(decode(&framed[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// What schema 4 wrote (no batch inside) still reads, for the migration.
    #[test]
    fn schema_4_values_read_with_their_row_batch() {
        let mut v4 = Vec::new();
        for (id, index, json) in [("a", 0u64, "{}"), ("b", 5, "[1]")] {
            v4.extend_from_slice(&(id.len() as u32).to_le_bytes());
            v4.extend_from_slice(id.as_bytes());
            v4.extend_from_slice(&index.to_le_bytes());
            v4.extend_from_slice(&(json.len() as u32).to_le_bytes());
            v4.extend_from_slice(json.as_bytes());
        }
        let read = decode_v4(&v4, 9).unwrap();
        assert_eq!(
            read,
            [
                FramedResult {
                    id: "a",
                    batch: 9,
                    index: 0,
                    json: "{}"
                },
                FramedResult {
                    id: "b",
                    batch: 9,
                    index: 5,
                    json: "[1]"
                },
            ]
        );
    }
}
