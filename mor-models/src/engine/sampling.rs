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

/// A sampler: [`SamplingParams`] plus the request's own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
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
        let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - m) / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let u = self.rng.uniform() * z;
        let mut acc = 0.0;
        for (i, &x) in w.iter().enumerate() {
            acc += x;
            if u < acc {
                return Ok(i as u32);
            }
        }
        // Rounding left `acc` a hair below `u`: the last token.
        Ok(w.len() as u32 - 1)
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
