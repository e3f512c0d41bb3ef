//! Axis ticks at "nice" numbers (1, 2 or 5 times a power of ten) and their labels.

/// Ticks chosen for one axis: the axis range `[lo, hi]` (which contains the data and starts
/// and ends on a tick) and the tick values.
#[derive(Debug, Clone, PartialEq)]
pub struct NiceTicks {
    /// Lower end of the axis.
    pub lo: f64,
    /// Upper end of the axis.
    pub hi: f64,
    /// Distance between neighbouring ticks (for a log axis: 0, the ticks being 1-2-5 per decade
    /// or decades).
    pub step: f64,
    /// Tick values, ascending, from `lo` to `hi`.
    pub ticks: Vec<f64>,
}

/// The smallest number of the form 1, 2 or 5 times a power of ten that is at least `raw`
/// (`raw` must be positive and finite; anything else gives 1).
///
/// # Examples
///
/// ```
/// use mor_models::report::nice_step;
/// assert_eq!(nice_step(0.2), 0.2);
/// assert_eq!(nice_step(0.156), 0.2);
/// assert_eq!(nice_step(3.0), 5.0);
/// assert_eq!(nice_step(7.0), 10.0);
/// ```
pub fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let exp = raw.log10().floor();
    let base = 10f64.powi(exp as i32);
    let mantissa = raw / base;
    let nice = if mantissa <= 1.0 + 1e-9 {
        1.0
    } else if mantissa <= 2.0 + 1e-9 {
        2.0
    } else if mantissa <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    round_to_step_decimals(nice * base, nice * base)
}

/// Linear ticks covering `[min, max]` with at most `target + 1` ticks: the step is
/// [`nice_step`]`((max - min) / target)` and the axis ends are rounded outwards to multiples of
/// it.
///
/// A degenerate range (`min == max`) is widened by 10% of the value (or by 1 around zero);
/// non-finite bounds give the range `[0, 1]`, and swapped bounds are put in order.
///
/// # Examples
///
/// ```
/// use mor_models::report::nice_ticks;
/// let t = nice_ticks(2.71, 3.49, 5);
/// assert_eq!((t.lo, t.hi, t.step), (2.6, 3.6, 0.2));
/// assert_eq!(t.ticks, vec![2.6, 2.8, 3.0, 3.2, 3.4, 3.6]);
/// ```
pub fn nice_ticks(min: f64, max: f64, target: usize) -> NiceTicks {
    let (mut min, mut max) = if min.is_finite() && max.is_finite() {
        (min, max)
    } else {
        (0.0, 1.0)
    };
    if min > max {
        std::mem::swap(&mut min, &mut max);
    }
    if !(max - min).is_finite() {
        (min, max) = (0.0, 1.0);
    }
    if min == max {
        let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
        min -= pad;
        max += pad;
    }
    let target = target.max(1);
    let step = nice_step((max - min) / target as f64);
    let first = (min / step + 1e-9).floor() as i64;
    let last = (max / step - 1e-9).ceil() as i64;
    let ticks: Vec<f64> = (first..=last.max(first + 1))
        .map(|i| round_to_step_decimals(i as f64 * step, step))
        .collect();
    NiceTicks {
        lo: ticks[0],
        hi: ticks[ticks.len() - 1],
        step,
        ticks,
    }
}

/// Ticks for a logarithmic axis covering `[min, max]` (both positive): the axis runs from the
/// decade at or below `min` to the decade at or above `max`. With at most two decades the
/// ticks are 1, 2 and 5 times each power of ten; otherwise one tick per decade (every
/// `k`-th decade when there are more than eight).
///
/// Non-positive or non-finite bounds give the decade `[1, 10]`.
///
/// # Examples
///
/// ```
/// use mor_models::report::log_ticks;
/// let t = log_ticks(3e13, 2e15);
/// assert_eq!((t.lo, t.hi), (1e13, 1e16));
/// assert_eq!(t.ticks, vec![1e13, 1e14, 1e15, 1e16]);
/// ```
pub fn log_ticks(min: f64, max: f64) -> NiceTicks {
    let ok = |x: f64| x.is_finite() && x > 0.0;
    let (mut min, mut max) = if ok(min) && ok(max) {
        (min, max)
    } else {
        (1.0, 10.0)
    };
    if min > max {
        std::mem::swap(&mut min, &mut max);
    }
    let lo_exp = (min.log10() + 1e-9).floor() as i32;
    let mut hi_exp = (max.log10() - 1e-9).ceil() as i32;
    if hi_exp <= lo_exp {
        hi_exp = lo_exp + 1;
    }
    let decades = hi_exp - lo_exp;
    let mut ticks = Vec::new();
    if decades <= 2 {
        for e in lo_exp..hi_exp {
            for m in [1.0, 2.0, 5.0] {
                ticks.push(m * 10f64.powi(e));
            }
        }
        ticks.push(10f64.powi(hi_exp));
    } else {
        let every = (decades + 7) / 8;
        let mut e = lo_exp;
        while e < hi_exp {
            ticks.push(10f64.powi(e));
            e += every;
        }
        ticks.push(10f64.powi(hi_exp));
    }
    NiceTicks {
        lo: 10f64.powi(lo_exp),
        hi: 10f64.powi(hi_exp),
        step: 0.0,
        ticks,
    }
}

/// Rounds `v` to the decimals that `step` has, removing float noise (`0.30000000000000004`).
fn round_to_step_decimals(v: f64, step: f64) -> f64 {
    let decimals = (-step.log10().floor()).clamp(0.0, 15.0) as i32;
    if decimals == 0 {
        return v.round();
    }
    let scale = 10f64.powi(decimals);
    let r = (v * scale).round() / scale;
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// Formats a tick value: plain decimals with as many places as the step needs, or compact
/// scientific notation (`2.5e5`, `1e13`) for very large or very small magnitudes.
///
/// `step` is the tick step of a linear axis, or 0 for a log axis.
pub fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let mag = v.abs();
    if !(1e-3..1e5).contains(&mag) {
        let exp = mag.log10().floor() as i32;
        let mantissa = v / 10f64.powi(exp);
        let m = format!("{:.2}", mantissa);
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{exp}");
    }
    let decimals = if step > 0.0 {
        (-step.log10().floor()).clamp(0.0, 10.0) as usize
    } else {
        (-mag.log10().floor()).clamp(0.0, 10.0) as usize
    };
    format!("{v:.decimals$}")
}
