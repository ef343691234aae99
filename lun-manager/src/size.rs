//! Human sizes: `20G`, `512M`, `1T`, `4096` (binary units), and back.

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

#[cfg(test)]
mod tests {
    use super::*;

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
