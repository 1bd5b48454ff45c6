//! Parsers for command-line values: sizes and durations. clap shows their errors as usage
//! errors (status 2).

use vmcall_abi::layout::{MAX_RAM, MIN_RAM, RAM_ALIGN};

/// Why a command-line value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A size with a suffix other than K, M, G or B.
    #[error("unknown size unit '{0}' (use K, M or G)")]
    SizeUnit(String),
    /// Not a size at all.
    #[error("'{0}' is not a size like 64M or 1G")]
    NotASize(String),
    /// A size beyond 2^64 bytes.
    #[error("'{0}' is too large")]
    TooLarge(String),
    /// A size guest RAM cannot have.
    #[error(
        "'{0}' is not a guest RAM size: it must be a multiple of {align}M from {min}M to {max}G",
        align = RAM_ALIGN >> 20, min = MIN_RAM >> 20, max = MAX_RAM >> 30
    )]
    NotRam(String),
    /// Not a number (for --pv-features).
    #[error(transparent)]
    Number(#[from] vmcall_vmm::hypercall::handlers::SpecError),
    /// A PV feature mask wider than CPUID's 32-bit EAX.
    #[error("{0:#x} does not fit in 32 bits (CPUID EAX)")]
    Not32Bits(u64),
    /// Not a duration at all.
    #[error("'{0}' is not a duration like 10s or 500ms")]
    NotADuration(String),
    /// A duration with a unit other than ms, s or m.
    #[error("unknown duration unit '{0}' (use ms, s or m)")]
    DurationUnit(String),
    /// A duration beyond 10^9 seconds (or not finite).
    #[error("'{0}' is out of range")]
    OutOfRange(String),
    /// Zero or none where a positive duration is needed.
    #[error("'{0}' is not a positive duration like 1s or 200ms")]
    NotPositive(String),
}

/// `64M`, `1G`, `512K`, `2097152` (bytes); suffixes are binary (KiB, MiB, GiB).
pub fn size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let mult = match t[i..].to_ascii_lowercase().as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                "b" => 1,
                other => return Err(ValueError::SizeUnit(other.into())),
            };
            (&t[..i], mult)
        }
    };
    let n: u64 = num.parse().map_err(|_| ValueError::NotASize(s.into()))?;
    n.checked_mul(mult).ok_or_else(|| ValueError::TooLarge(s.into()))
}

/// A `--memory` value: a size that is a multiple of 2M, from 2M to 64G.
pub fn memory(s: &str) -> Result<u64, ValueError> {
    let bytes = size(s)?;
    if !(MIN_RAM..=MAX_RAM).contains(&bytes) || !bytes.is_multiple_of(RAM_ALIGN) {
        return Err(ValueError::NotRam(s.into()));
    }
    Ok(bytes)
}

/// A `--pv-features` mask: a 32-bit number, decimal or 0x-hex.
pub fn pv_features(s: &str) -> Result<u32, ValueError> {
    let mask = vmcall_vmm::hypercall::handlers::parse_u64(s)?;
    u32::try_from(mask).map_err(|_| ValueError::Not32Bits(mask))
}

/// A `--timeout` value (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<std::time::Duration>);

/// Parse a `--timeout` value.
pub fn timeout(s: &str) -> Result<Timeout, ValueError> {
    duration(s).map(Timeout)
}

/// `10s`, `500ms`, `2m`, `1.5s`, or a bare number of seconds; zero in any unit (`0`, `0s`,
/// `0ms`) or `none` for no timeout.
pub fn duration(s: &str) -> Result<Option<std::time::Duration>, ValueError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| ValueError::NotADuration(s.into()))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        other => return Err(ValueError::DurationUnit(other.into())),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(ValueError::OutOfRange(s.into()));
    }
    let d = std::time::Duration::from_secs_f64(secs);
    Ok((!d.is_zero()).then_some(d))
}

/// A `--exec-deadline`: a positive duration such as 1s or 200ms.
pub fn deadline(s: &str) -> Result<std::time::Duration, ValueError> {
    match duration(s)? {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ValueError::NotPositive(s.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes() {
        assert_eq!(size("64M"), Ok(64 << 20));
        assert_eq!(size("1g"), Ok(1 << 30));
        assert_eq!(size("4096"), Ok(4096));
        assert!(size("12X").is_err());
        assert!(size("M").is_err());
        assert!(size("99999999999999G").is_err());
        assert_eq!(memory("32M"), Ok(32 << 20));
        assert_eq!(memory("64G"), Ok(64 << 30));
        for bad in ["3M", "0", "1M", "65G", "128G"] {
            assert!(memory(bad).unwrap_err().to_string().contains("multiple of 2M"), "{bad}");
        }
        assert_eq!(pv_features("0x2080"), Ok(0x2080));
        assert!(pv_features("0x100000000").unwrap_err().to_string().contains("32 bits"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration("10s"), Ok(Some(Duration::from_secs(10))));
        assert_eq!(duration("500ms"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(duration("2m"), Ok(Some(Duration::from_secs(120))));
        assert_eq!(duration("3"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(duration("none"), Ok(None));
        for zero in ["0", "0s", "0ms", "0.0m"] {
            assert_eq!(duration(zero), Ok(None), "{zero}");
        }
        assert!(deadline("0s").is_err());
        assert!(duration("ten").is_err());
        assert!(duration("5h").is_err());
    }
}
