//! Lower-case hex encoding for ids, hashes and key files.

/// `bytes` as lower-case hex, without the per-byte formatting and allocation of `format!`
/// (this runs once per decrypted message, for the outbox id).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_become_lower_case_hex_two_digits_each() {
        assert_eq!(super::to_hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(super::to_hex(&[]), "");
    }
}
