//! Byte sizes written as integers (`4096`) or strings with a binary suffix
//! (`"4K"`, `"32M"`, `"1G"`, `"2T"`), as on the `lunctl` command line.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => {
                        return Err(format!(
                            "size {s:?} has unknown suffix {c:?} (use K, M, G, T)"
                        ))
                    }
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "size {s:?} is not a number with optional K/M/G/T suffix"
            ));
        }
        let n: u64 = digits
            .parse()
            .map_err(|e| format!("size {s:?} is not a number: {e}"))?;
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} overflows 64 bits"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte count like 4096 or a string like \"32M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("4K".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("64M".parse::<ByteSize>().unwrap(), ByteSize(64 << 20));
        assert_eq!("1g".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("20G".parse::<ByteSize>().unwrap(), ByteSize(20 << 30));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for bad in [
            "",
            "M",
            "12Q",
            "-1",
            "1.5G",
            "99999999999999999999",
            "17179869184T",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} accepted");
        }
    }
}
