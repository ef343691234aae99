//! The one size grammar of lungate, shared by every command line
//! (`lunctl`, `lungate`, `vmm-shim`) and every TOML file: byte counts
//! written as integers (`4096`) or with a binary unit (`4K`, `512MiB`,
//! `1.5G`, `2T`; K = 1024), and back to text for people.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Parse a size such as `20G`, `1.5G`, `512MiB`, `4096`. Units are binary
/// (K = 1024). Errors say what was wrong.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: expected a number like 20G"));
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        u => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {u:?} (use K, M, G, T or P)"
            ))
        }
    };
    let too_big = || format!("size {s:?} is too large");
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') || int.is_empty() && frac.is_empty() {
            return Err(format!("invalid size {s:?}"));
        }
        let whole: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| too_big())?
        };
        let whole = whole
            .checked_shl(shift)
            .filter(|v| v >> shift == whole)
            .ok_or_else(too_big)?;
        let digits = frac.len().min(18) as u32;
        let f: u64 = frac[..digits as usize]
            .parse()
            .map_err(|_| format!("invalid size {s:?}"))?;
        let part = ((f as u128) << shift) / 10u128.pow(digits);
        return whole.checked_add(part as u64).ok_or_else(too_big);
    }
    let n: u64 = num.parse().map_err(|_| too_big())?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(too_big)
}

/// Format bytes for people: `20 GiB`, `1.5 GiB`, `4096 B`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut i = 0;
    let mut v = n as f64;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
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
    fn toml_and_command_line_take_the_same_sizes() {
        for s in ["512MiB", "1.5G", "4096", "2T", "64k"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().0, parse_size(s).unwrap());
        }
        assert_eq!("1.5G".parse::<ByteSize>().unwrap(), ByteSize(3 << 29));
    }

    #[test]
    fn rejects_garbage_and_overflow_as_sizes() {
        for bad in ["", "M", "12Q", "-1", "99999999999999999999", "17179869184T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_binary_units() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        for bad in [
            "",
            "G",
            "12X",
            "1..5G",
            "99999999999P",
            "-1G",
            "18446744073709551616",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(20 << 30), "20 GiB");
        assert_eq!(human(1536 << 20), "1.50 GiB");
        assert_eq!(human(100), "100 B");
    }
}
