//! Token sampling: greedy, temperature, top-k and top-p (nucleus), drawn from a seeded
//! [`Rng`] so that every generation is reproducible.

use crate::{Error, Result};
use mor_core::rng::Rng;

/// How the next token is chosen from the logits.
///
/// `temperature = 0` (or `top_k = 1`) is greedy decoding: the first index of the largest
/// logit. Otherwise the logits are divided by the temperature, cut to the `top_k` largest
/// (`0` = no cut), turned into probabilities, cut to the smallest prefix whose probability
/// reaches `top_p` (`1` = no cut) and sampled.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature (`0` = greedy).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (`0` = all).
    pub top_k: usize,
    /// Nucleus: keep the most likely tokens until their probability reaches `top_p` (`1` =
    /// all).
    pub top_p: f64,
    /// Seed of the request's random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Whether these parameters pick the arg-max.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks the ranges: `temperature` finite and `>= 0`, `top_p` in `(0, 1]`.
    ///
    /// # Errors
    /// [`Error::Msg`] naming the bad field and the allowed range.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::msg(format!(
                "sampling temperature {} is not allowed: use a finite number >= 0 (0 = greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::msg(format!(
                "sampling top_p {} is not allowed: use a probability in (0, 1] (1 = off)",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The first index of the largest value.
///
/// # Errors
/// [`Error::Msg`] when `logits` is empty or holds a NaN.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(Error::msg(format!("logit {i} is NaN; cannot pick a token")));
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
        .ok_or_else(|| Error::msg("no logits to pick a token from"))
}

/// Refuses empty logits and NaN or infinite values.
fn check_finite(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::msg("no logits to sample a token from"));
    }
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::msg(format!(
            "logit {i} is {}; cannot sample a token",
            logits[i]
        )));
    }
    Ok(())
}

/// `w[i] = exp((logits[i] - m) / t)` for `logits[i] <= m`, `t > 0` (so every argument is
/// at most 0), with [`exp_nonpositive`]. Vectorised (AVX2 from the kernels' tier
/// [`mor_kernels::cpu::isa::tier`] up, so `MOR_CPU_TIER` lowers it like every kernel;
/// SSE2 otherwise) with the same bits everywhere: only correctly rounded additions,
/// multiplications and divisions, no fused multiply-add.
pub(crate) fn exp_weights(logits: &[f32], m: f64, t: f64, w: &mut Vec<f64>) {
    w.clear();
    w.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if mor_kernels::cpu::isa::tier() >= mor_kernels::cpu::isa::Tier::Avx2 {
        // SAFETY: the tier is at most what the CPU supports, so it has AVX2.
        unsafe { exp_weights_avx2(logits, m, t, w) };
        return;
    }
    exp_weights_body(logits, m, t, w);
}

/// [`exp_weights_body`] compiled with AVX2 (4 lanes of f64; no FMA, so the same bits).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_weights_avx2(logits: &[f32], m: f64, t: f64, w: &mut [f64]) {
    exp_weights_body(logits, m, t, w)
}

#[inline(always)]
fn exp_weights_body(logits: &[f32], m: f64, t: f64, w: &mut [f64]) {
    for (wi, &l) in w.iter_mut().zip(logits) {
        *wi = exp_nonpositive((l as f64 - m) / t);
    }
}

/// `e^x` for `x <= 0` (a NaN gives 0), relative error below `1e-15`; `0` below `-708`
/// (where `e^x` is under `3.4e-308`, the smallest normal f64). Written without branches or
/// table lookups so that it vectorises: `x = n ln 2 + r` with `n = round(x / ln 2)`
/// (Cody–Waite: `ln 2` split in two parts, the first exact in `n · ln2_hi`), `|r| <=
/// ln 2 / 2`, `e^r` by its Taylor polynomial to degree 13 (remainder below `2e-17`), and
/// `2^n` built from its exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f64) -> f64 {
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with 21 trailing zero bits (so n · LN2_HI is exact for |n| < 2^21).
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    // 1.5 · 2^52: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    const INV_FACT: [f64; 14] = {
        let mut c = [1f64; 14];
        let mut k = 1;
        while k < 14 {
            c[k] = c[k - 1] / k as f64;
            k += 1;
        }
        c
    };
    // In range for the exponent bits; NaN and anything below -708 are set to 0 below.
    let xc = x.clamp(-708.0, 0.0);
    let tn = xc * std::f64::consts::LOG2_E + SHIFT;
    let n = tn - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = INV_FACT[13];
    for &c in INV_FACT[..13].iter().rev() {
        p = p * r + c;
    }
    // n in [-1022, 0]: the integer is the difference of the bit patterns.
    let ni = tn.to_bits().wrapping_sub(SHIFT.to_bits()) as i64;
    let scale = f64::from_bits(((ni + 1023) as u64) << 52);
    if x >= -708.0 {
        p * scale
    } else {
        0.0
    }
}

/// A sampler: [`SamplingParams`] plus the request's own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Scratch for the weights of one draw (kept to avoid an allocation per token).
    weights: Vec<f64>,
}

impl Sampler {
    /// A sampler whose stream is derived from `params.seed` and `stream` (e.g. the request
    /// id), so that concurrent requests draw independent, reproducible numbers.
    ///
    /// # Errors
    /// As [`SamplingParams::validate`].
    pub fn new(params: SamplingParams, stream: u64) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: Rng::derive(params.seed, &format!("sampler.{stream}")),
            weights: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token.
    ///
    /// # Errors
    /// [`Error::Msg`] when `logits` is empty or holds a NaN (or, when sampling, an infinite
    /// value).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        if self.params.top_p < 1.0 {
            let probs = self.distribution(logits)?;
            return Ok(self.draw(probs.iter().copied()));
        }
        // Without a nucleus cut the order of the candidates does not matter: no sort, one
        // pass over the (top-k) logits.
        check_finite(logits)?;
        let t = self.params.temperature;
        let k = self.params.top_k;
        if k > 0 && k < logits.len() {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            idx.select_nth_unstable_by(k - 1, |a, b| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            });
            idx.truncate(k);
            let m = idx
                .iter()
                .map(|&i| logits[i as usize])
                .fold(f32::NEG_INFINITY, f32::max) as f64;
            let w: Vec<(u32, f64)> = idx
                .iter()
                .map(|&i| (i, ((logits[i as usize] as f64 - m) / t).exp()))
                .collect();
            let z: f64 = w.iter().map(|x| x.1).sum();
            return Ok(self.draw(w.into_iter().map(|(i, x)| (i, x / z))));
        }
        // One `exp` per logit: the weights are kept and the uniform draw is scaled by their
        // sum instead of normalising every weight.
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut w = std::mem::take(&mut self.weights);
        exp_weights(logits, m, t, &mut w);
        let z: f64 = w.iter().sum();
        let u = self.rng.uniform() * z;
        let mut acc = 0.0;
        let mut pick = w.len() as u32 - 1;
        for (i, &x) in w.iter().enumerate() {
            acc += x;
            if u < acc {
                pick = i as u32;
                break;
            }
        }
        // (Rounding may leave `acc` a hair below `u`: then the last token.)
        self.weights = w;
        Ok(pick)
    }

    /// Draws from `(token, probability)` pairs summing to 1.
    fn draw(&mut self, probs: impl Iterator<Item = (u32, f64)>) -> u32 {
        let u = self.rng.uniform();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, p) in probs {
            acc += p;
            last = i;
            if u < acc {
                return i;
            }
        }
        // Rounding left `acc` a hair below 1: the last token.
        last
    }

    /// The distribution [`Sampler::sample`] draws from: `(token, probability)` pairs,
    /// most likely first (ties by lower id), summing to 1.
    ///
    /// # Errors
    /// As [`Sampler::sample`].
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<(u32, f64)>> {
        let p = &self.params;
        check_finite(logits)?;
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        idx.sort_by(by_logit);
        if p.temperature == 0.0 {
            return Ok(vec![(idx[0], 1.0)]);
        }
        let t = p.temperature;
        let m = logits[idx[0] as usize] as f64 / t;
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| (logits[i as usize] as f64 / t - m).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut out: Vec<(u32, f64)> = idx.iter().zip(&w).map(|(&i, &wi)| (i, wi / z)).collect();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = out.len();
            for (j, &(_, q)) in out.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = j + 1;
                    break;
                }
            }
            out.truncate(keep.max(1));
            let z: f64 = out.iter().map(|&(_, q)| q).sum();
            out.iter_mut().for_each(|(_, q)| *q /= z);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 11,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]).unwrap(), 1);
        let mut s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        assert_eq!(s.sample(&[0.1, -3.0, 0.7]).unwrap(), 2);
        // top_k = 1 is greedy whatever the temperature.
        let mut s = Sampler::new(params(5.0, 1, 1.0), 0).unwrap();
        assert_eq!(s.sample(&[0.1, -3.0, 0.7]).unwrap(), 2);
        assert!(argmax(&[0.0, f32::NAN]).is_err());
        assert!(argmax(&[]).is_err());
    }

    #[test]
    fn distribution_matches_softmax_top_k_and_top_p() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let s = Sampler::new(params(2.0, 0, 1.0), 0).unwrap();
        let d = s.distribution(&logits).unwrap();
        let w: Vec<f64> = [3.0f64, 2.0, 1.0, 0.0]
            .iter()
            .map(|x| (x / 2.0).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let ids: Vec<u32> = d.iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 2, 0, 3]);
        for (k, &(_, p)) in d.iter().enumerate() {
            assert!((p - w[k] / z).abs() < 1e-12, "{k}: {p} vs {}", w[k] / z);
        }
        // top-k keeps the two largest, renormalised.
        let d = Sampler::new(params(2.0, 2, 1.0), 0)
            .unwrap()
            .distribution(&logits)
            .unwrap();
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - w[0] / (w[0] + w[1])).abs() < 1e-12);
        // top-p keeps the smallest prefix reaching p: probabilities 0.455, 0.276, 0.167, 0.102,
        // so p = 0.7 keeps two tokens and p = 0.8 three.
        let d = Sampler::new(params(2.0, 0, 0.8), 0)
            .unwrap()
            .distribution(&logits)
            .unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 0]);
        let d = Sampler::new(params(2.0, 0, 0.7), 0)
            .unwrap()
            .distribution(&logits)
            .unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2]);
        let d = Sampler::new(params(2.0, 0, 0.01), 0)
            .unwrap()
            .distribution(&logits)
            .unwrap();
        assert_eq!(d, vec![(1, 1.0)]);
    }

    #[test]
    fn draws_follow_the_distribution_and_are_reproducible() {
        let logits = [0.0f32, 1.0, 0.5];
        let mut s = Sampler::new(params(1.0, 0, 1.0), 3).unwrap();
        let want = s.distribution(&logits).unwrap();
        let n = 20_000;
        let mut counts = [0usize; 3];
        let mut first = Vec::new();
        for i in 0..n {
            let t = s.sample(&logits).unwrap();
            counts[t as usize] += 1;
            if i < 50 {
                first.push(t);
            }
        }
        for &(i, p) in &want {
            let f = counts[i as usize] as f64 / n as f64;
            // Four standard deviations of a binomial frequency.
            let tol = 4.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (f - p).abs() < tol,
                "token {i}: frequency {f}, probability {p}"
            );
        }
        let mut again = Sampler::new(params(1.0, 0, 1.0), 3).unwrap();
        let replay: Vec<u32> = (0..50).map(|_| again.sample(&logits).unwrap()).collect();
        assert_eq!(first, replay);
        let mut other = Sampler::new(params(1.0, 0, 1.0), 4).unwrap();
        let other: Vec<u32> = (0..50).map(|_| other.sample(&logits).unwrap()).collect();
        assert_ne!(first, other, "different streams must draw differently");
    }

    #[test]
    fn every_sampling_path_draws_from_its_distribution() {
        let logits = [0.3f32, -1.0, 2.0, 1.1, 0.0, 1.9];
        for (k, top_p) in [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.9)] {
            let mut s = Sampler::new(params(0.8, k, top_p), 5).unwrap();
            let want = s.distribution(&logits).unwrap();
            let n = 20_000;
            let mut counts = [0usize; 6];
            for _ in 0..n {
                counts[s.sample(&logits).unwrap() as usize] += 1;
            }
            for i in 0..6u32 {
                let p = want.iter().find(|x| x.0 == i).map(|x| x.1).unwrap_or(0.0);
                let f = counts[i as usize] as f64 / n as f64;
                let tol = 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-12;
                assert!(
                    (f - p).abs() <= tol,
                    "top_k {k}, top_p {top_p}: token {i} frequency {f}, probability {p}"
                );
            }
        }
    }

    #[test]
    fn vectorised_exp_matches_libm() {
        // Both sides of every reduction boundary (n ln 2 ± ln 2 / 2), integers, tiny and
        // huge magnitudes, the cut at -708.
        let mut xs = vec![
            0.0, -0.0, -1e-300, -1e-17, -1e-9, -0.5, -1.0, -708.0, -707.99,
        ];
        let mut rng = mor_core::rng::Rng::new(5);
        for _ in 0..20_000 {
            xs.push(-708.0 * rng.uniform());
            xs.push(-rng.uniform() * 4.0);
        }
        for n in 0..1021 {
            let b = -(n as f64 + 0.5) * std::f64::consts::LN_2;
            xs.extend([b, b.next_up(), b.next_down(), -((n % 709) as f64)]);
        }
        for &x in &xs {
            assert!(x >= -708.0, "{x}");
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 1e-15 * want,
                "exp({x:e}) = {got:e}, libm {want:e}"
            );
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        for x in [-708.01, -745.0, -1e300, f64::NEG_INFINITY, f64::NAN] {
            assert_eq!(exp_nonpositive(x), 0.0, "{x}");
        }
        // The vector loop: the same values as one at a time, whatever the length.
        let logits: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut w = vec![7.0; 3];
        exp_weights(&logits, m, 0.7, &mut w);
        let want: Vec<f64> = logits
            .iter()
            .map(|&l| exp_nonpositive((l as f64 - m) / 0.7))
            .collect();
        assert_eq!(w, want);
    }

    #[test]
    fn bad_parameters_and_logits_are_errors() {
        assert!(Sampler::new(params(-1.0, 0, 1.0), 0).is_err());
        assert!(Sampler::new(params(f64::NAN, 0, 1.0), 0).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0), 0).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5), 0).is_err());
        let mut s = Sampler::new(params(1.0, 0, 1.0), 0).unwrap();
        assert!(s.sample(&[0.0, f32::INFINITY]).is_err());
        assert!(s.sample(&[]).is_err());
    }
}
