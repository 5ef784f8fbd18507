//! Reading input with a size limit: `decrypt` holds its whole input in memory (it is one batch,
//! committed in one transaction), so an endless or huge input (`/dev/zero`, a runaway pipe) must
//! fail fast with an error that names the limit and the flag that raises it, before the memory
//! grows.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

/// A size limit in bytes, parsed from `N`, `NK`/`NKiB`, `NM`/`NMiB` or `NG`/`NGiB` (binary units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteLimit(pub u64);

impl ByteLimit {
    /// The default limit of `decrypt`'s input: 64 MiB, about 100,000 typical to-device events.
    pub const DEFAULT_INPUT: ByteLimit = ByteLimit(64 * 1024 * 1024);
}

impl fmt::Display for ByteLimit {
    /// `64 MiB (67108864 bytes)`, or just the bytes when not a whole number of KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0;
        let unit = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .into_iter()
            .find(|(size, _)| bytes >= *size && bytes.is_multiple_of(*size));
        match unit {
            Some((size, name)) => write!(f, "{} {name} ({bytes} bytes)", bytes / size),
            None => write!(f, "{bytes} bytes"),
        }
    }
}

impl FromStr for ByteLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(digits_end);
        let number: u64 = digits.parse().map_err(|_| {
            format!("{text:?} is not a size: expected bytes, or a number with K, M or G (KiB, MiB, GiB)")
        })?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}: use K, M or G (KiB, MiB, GiB)"
                ))
            }
        };
        let bytes = number
            .checked_mul(multiplier)
            .ok_or_else(|| format!("{text:?} is too large"))?;
        if bytes == 0 {
            return Err("the limit must be at least 1 byte".to_owned());
        }
        Ok(ByteLimit(bytes))
    }
}

/// Why input could not be read.
#[derive(Debug)]
pub enum InputError {
    /// The input is larger than the limit.
    TooLarge {
        /// `input FILE` or `stdin`.
        what: String,
        /// The limit.
        limit: ByteLimit,
        /// The size, when the file system told it before reading.
        size: Option<u64>,
    },
    /// Reading failed, or the input is not UTF-8.
    Read(String),
}

impl InputError {
    /// The message, naming `flag` as the way to raise the limit when there is one.
    pub fn message(&self, flag: Option<&str>) -> String {
        match self {
            InputError::TooLarge { what, limit, size } => {
                let size = match size {
                    Some(size) => format!(" ({size} bytes)"),
                    None => String::new(),
                };
                let raise = match flag {
                    Some(flag) => format!("; pass {flag} N to raise it (e.g. {flag} 256M)"),
                    None => String::new(),
                };
                format!(
                    "{what}{size} is larger than the limit of {limit}{raise}. The whole input is \
                     held in memory and decrypted as one batch in one transaction: split a larger \
                     input into several runs"
                )
            }
            InputError::Read(message) => message.clone(),
        }
    }
}

/// Reads `path` (`None` or `-`: stdin) as UTF-8 text of at most `limit` bytes.
///
/// A regular file's length is checked before reading; anything else (stdin, a pipe, a device such
/// as `/dev/zero`, or a file that grows while read) is read up to `limit + 1` bytes and refused at
/// that point, so memory never grows past the limit.
pub fn read_text(path: Option<&Path>, limit: ByteLimit) -> Result<String, InputError> {
    match path.filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            let what = format!("the input {}", path.display());
            let file = std::fs::File::open(path)
                .map_err(|e| InputError::Read(format!("cannot read {what}: {e}")))?;
            let metadata = file
                .metadata()
                .map_err(|e| InputError::Read(format!("cannot read {what}: {e}")))?;
            if metadata.is_file() && metadata.len() > limit.0 {
                return Err(InputError::TooLarge {
                    what,
                    limit,
                    size: Some(metadata.len()),
                });
            }
            read_bounded(file, limit, what)
        }
        None => read_bounded(std::io::stdin().lock(), limit, "stdin".to_owned()),
    }
}

/// Reads at most `limit` bytes from `reader`: one byte more fails with [`InputError::TooLarge`].
pub fn read_bounded(
    reader: impl Read,
    limit: ByteLimit,
    what: String,
) -> Result<String, InputError> {
    let mut bytes = Vec::new();
    reader
        .take(limit.0.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| InputError::Read(format!("cannot read {what}: {e}")))?;
    if bytes.len() as u64 > limit.0 {
        return Err(InputError::TooLarge {
            what,
            limit,
            size: None,
        });
    }
    String::from_utf8(bytes).map_err(|e| InputError::Read(format!("{what} is not UTF-8 text: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!("1000".parse(), Ok(ByteLimit(1000)));
        assert_eq!("64M".parse(), Ok(ByteLimit(64 << 20)));
        assert_eq!("64MiB".parse(), Ok(ByteLimit(64 << 20)));
        assert_eq!("2 g".parse(), Ok(ByteLimit(2 << 30)));
        assert_eq!("4k".parse(), Ok(ByteLimit(4096)));
        assert!("0".parse::<ByteLimit>().is_err());
        assert!("12MB".parse::<ByteLimit>().is_err());
        assert!("lots".parse::<ByteLimit>().is_err());
        assert!("99999999999999999999G".parse::<ByteLimit>().is_err());
        assert!(u64::MAX.to_string().parse::<ByteLimit>().is_ok());
    }

    #[test]
    fn limits_display_in_the_largest_whole_unit() {
        assert_eq!(
            ByteLimit::DEFAULT_INPUT.to_string(),
            "64 MiB (67108864 bytes)"
        );
        assert_eq!(ByteLimit(1536).to_string(), "1536 bytes");
        assert_eq!(ByteLimit(3 << 10).to_string(), "3 KiB (3072 bytes)");
    }

    #[test]
    fn a_reader_is_refused_one_byte_past_the_limit() {
        let read = |text: &str| read_bounded(text.as_bytes(), ByteLimit(4), "stdin".to_owned());
        assert_eq!(read("abcd").unwrap(), "abcd");
        assert!(matches!(
            read("abcde"),
            Err(InputError::TooLarge { size: None, .. })
        ));
        // An endless reader stops at limit + 1 bytes.
        let endless = std::io::repeat(b'x');
        assert!(matches!(
            read_bounded(endless, ByteLimit(1 << 20), "stdin".to_owned()),
            Err(InputError::TooLarge { .. })
        ));
        assert!(matches!(
            read_bounded(&[0xff, 0xfe][..], ByteLimit(4), "stdin".to_owned()),
            Err(InputError::Read(_))
        ));
    }
}
