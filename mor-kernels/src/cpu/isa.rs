//! Instruction-set tiers of the CPU kernels, chosen once at run time.
//!
//! Every hot loop of the `cpu` backend and of the decode products exists in up to four
//! versions, from the portable Rust loop to AVX-512 with the BF16 dot-product instructions
//! (`VDPBF16PS`). [`tier`] picks the highest one the CPU supports, so a binary built for
//! plain `x86_64` never executes an instruction the CPU lacks. The environment variable
//! [`TIER_ENV`] (`MOR_CPU_TIER`) forces a *lower* tier (`portable`, `avx2`, `avx512`,
//! `avx512bf16`), which is how the tests run every version on one machine; a tier above
//! what the CPU supports, or an unknown name, is ignored with a one-line notice on stderr.

use std::sync::OnceLock;

/// The environment variable that caps the tier (read once, at the first kernel call).
pub const TIER_ENV: &str = "MOR_CPU_TIER";

/// A set of instructions the kernels may use, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Plain Rust, compiled for the target's baseline (SSE2 on x86_64).
    Portable,
    /// AVX2 and FMA (256-bit f32 lanes).
    Avx2,
    /// AVX-512 F, BW, DQ and VL (512-bit f32 lanes), with AVX2 and FMA.
    Avx512,
    /// [`Tier::Avx512`] plus AVX512_BF16 (`VCVTNE2PS2BF16`, `VDPBF16PS`).
    Avx512Bf16,
}

impl Tier {
    /// Every tier, lowest first.
    pub const ALL: [Tier; 4] = [Tier::Portable, Tier::Avx2, Tier::Avx512, Tier::Avx512Bf16];

    /// The name used by [`TIER_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Avx512Bf16 => "avx512bf16",
        }
    }

    /// The tier called `name` ([`Tier::name`]), if any.
    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == name.trim())
    }

    /// Whether the bf16 dot-product instructions are available at this tier.
    pub fn has_bf16(self) -> bool {
        self >= Tier::Avx512Bf16
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The highest tier this CPU supports (ignores [`TIER_ENV`]).
pub fn detected() -> Tier {
    static DETECTED: OnceLock<Tier> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Tier {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl");
    if avx512 && is_x86_feature_detected!("avx512bf16") {
        Tier::Avx512Bf16
    } else if avx512 {
        Tier::Avx512
    } else if avx2 {
        Tier::Avx2
    } else {
        Tier::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Tier {
    Tier::Portable
}

/// The tier for `request` (the value of [`TIER_ENV`], if set) on a CPU supporting
/// `detected`, and the notice to print when the request is not followed.
pub fn resolve(request: Option<&str>, detected: Tier) -> (Tier, Option<String>) {
    let Some(req) = request else {
        return (detected, None);
    };
    match Tier::from_name(req) {
        Some(t) if t <= detected => (t, None),
        Some(t) => (
            detected,
            Some(format!(
                "note: {TIER_ENV}={t} asks for more than this CPU supports; using {detected}"
            )),
        ),
        None => (
            detected,
            Some(format!(
                "note: {TIER_ENV}={req:?} is not a tier (allowed: {}); using {detected}",
                Tier::ALL.map(Tier::name).join(", ")
            )),
        ),
    }
}

/// The tier the kernels use: [`detected`], lowered by [`TIER_ENV`]. Read once per process.
pub fn tier() -> Tier {
    static TIER: OnceLock<Tier> = OnceLock::new();
    *TIER.get_or_init(|| {
        let request = std::env::var(TIER_ENV).ok();
        let (t, notice) = resolve(request.as_deref(), detected());
        if let Some(n) = notice {
            eprintln!("{n}");
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_is_increasing() {
        for (i, t) in Tier::ALL.into_iter().enumerate() {
            assert_eq!(Tier::from_name(t.name()), Some(t));
            if i > 0 {
                assert!(Tier::ALL[i - 1] < t);
            }
        }
        assert_eq!(Tier::from_name("avx3"), None);
        assert!(Tier::Avx512Bf16.has_bf16() && !Tier::Avx512.has_bf16());
    }

    #[test]
    fn a_request_only_lowers_the_tier() {
        assert_eq!(resolve(None, Tier::Avx2), (Tier::Avx2, None));
        assert_eq!(
            resolve(Some("portable"), Tier::Avx512),
            (Tier::Portable, None)
        );
        assert_eq!(resolve(Some("avx2"), Tier::Avx2), (Tier::Avx2, None));
        let (t, n) = resolve(Some("avx512bf16"), Tier::Avx2);
        assert_eq!(t, Tier::Avx2);
        assert!(n.unwrap().contains("more than this CPU supports"));
        let (t, n) = resolve(Some("sse9"), Tier::Avx512);
        assert_eq!(t, Tier::Avx512);
        let n = n.unwrap();
        assert!(n.contains("\"sse9\"") && n.contains("portable, avx2, avx512, avx512bf16"));
    }

    #[test]
    fn the_chosen_tier_never_exceeds_the_cpu() {
        assert!(tier() <= detected());
    }
}
