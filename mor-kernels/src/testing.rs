//! Test support for every crate that checks numerics: seeded random tensors, closeness in the
//! spirit of `torch.testing.assert_close`, and f64 central finite-difference gradient checks.
//!
//! # Examples
//! ```
//! use candle_core::{DType, Device, Var};
//! use mor_kernels::testing::{assert_fd, randn};
//!
//! let x = Var::from_tensor(&randn(7, (2, 3), DType::F64, &Device::Cpu).unwrap()).unwrap();
//! // f(x) = Σ x³, whose gradient 3x² the check compares against central differences.
//! let report = assert_fd(&[&x], || Ok(x.as_tensor().powf(3.0)?.sum_all()?), 1e-5, 1e-6);
//! assert!(report.worst < 1e-6);
//! ```

use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};

/// Relative tolerance of f32 comparisons (`torch.testing` default for float32).
pub const F32_RTOL: f64 = 1.3e-6;
/// Absolute tolerance of f32 comparisons (`torch.testing` default for float32).
pub const F32_ATOL: f64 = 1e-5;
/// Relative tolerance of f64 comparisons (`torch.testing` default for float64).
pub const F64_RTOL: f64 = 1e-7;
/// Absolute tolerance of f64 comparisons (`torch.testing` default for float64).
pub const F64_ATOL: f64 = 1e-7;

/// A tensor of `shape` with N(0, 1) entries drawn from the seeded [`mor_core::rng::Rng`].
///
/// # Errors
/// A candle error if the tensor cannot be built (e.g. an unsupported dtype).
pub fn randn(seed: u64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let mut rng = mor_core::rng::Rng::new(seed);
    let v: Vec<f64> = (0..shape.elem_count()).map(|_| rng.normal()).collect();
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

/// The worst element of a closeness comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Closeness {
    /// Largest `|a - e| / (atol + rtol |e|)` over the elements: the comparison passes when it
    /// is at most 1. NaN in either tensor, where the other is not NaN, gives infinity.
    pub ratio: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Flat index of the element with the largest ratio.
    pub index: usize,
    /// `(actual, expected)` at that index.
    pub values: (f64, f64),
}

/// Compares `actual` against `expected` elementwise: `|a - e| <= atol + rtol |e|`.
///
/// # Errors
/// [`Error::Invalid`] when the shapes differ; a candle error if the tensors cannot be read.
pub fn closeness(actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) -> Result<Closeness> {
    if actual.dims() != expected.dims() {
        return Err(Error::Invalid {
            op: "closeness",
            msg: format!(
                "shape {:?} differs from the expected {:?}",
                actual.dims(),
                expected.dims()
            ),
        });
    }
    let a = actual
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let e = expected
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let mut out = Closeness {
        ratio: 0.0,
        max_abs: 0.0,
        index: 0,
        values: (0.0, 0.0),
    };
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        let ratio = if x.is_nan() && y.is_nan() || x == y {
            0.0
        } else if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else {
            (x - y).abs() / (atol + rtol * y.abs())
        };
        out.max_abs = out.max_abs.max((x - y).abs());
        if ratio > out.ratio || (i == 0 && ratio == 0.0) {
            out.ratio = ratio;
            out.index = i;
            out.values = (x, y);
        }
    }
    Ok(out)
}

/// Asserts `|a - e| <= atol + rtol |e|` elementwise and returns the comparison.
///
/// # Panics
/// When the shapes differ or some element is out of tolerance; the message names `what`, the
/// worst element and both values.
pub fn assert_close(
    what: &str,
    actual: &Tensor,
    expected: &Tensor,
    rtol: f64,
    atol: f64,
) -> Closeness {
    let c = closeness(actual, expected, rtol, atol).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        c.ratio <= 1.0,
        "{what}: not close (rtol {rtol:e}, atol {atol:e}): element {} is {} but expected {} \
         (ratio {:.3}, max abs diff {:e})",
        c.index,
        c.values.0,
        c.values.1,
        c.ratio,
        c.max_abs
    );
    c
}

/// The worst element of a finite-difference gradient check.
#[derive(Debug, Clone, PartialEq)]
pub struct FdReport {
    /// Largest `|numeric - analytic| / max(|numeric|, |analytic|, 1e-3)`.
    pub worst: f64,
    /// Which variable (position in the slice given) and flat element.
    pub at: (usize, usize),
    /// `(analytic, numeric)` at that element.
    pub values: (f64, f64),
    /// Number of elements checked.
    pub checked: usize,
}

/// Checks the gradients of the scalar `f()` with respect to every f64 variable in `vars`
/// against central finite differences `(f(x + eps) - f(x - eps)) / 2 eps`, one element at a
/// time. The relative error of an element is
/// `|numeric - analytic| / max(|numeric|, |analytic|, 1e-3)` (the floor keeps near-zero
/// gradients from dividing by zero). A variable that receives no gradient is compared as a
/// zero gradient. Every variable is restored before returning.
///
/// # Errors
/// [`Error::Invalid`] when a variable is not f64 or `f()` is not a scalar; errors of `f`.
pub fn fd_check(vars: &[&Var], f: impl Fn() -> Result<Tensor>, eps: f64) -> Result<FdReport> {
    let eval = || -> Result<f64> {
        let y = f()?;
        if y.elem_count() != 1 {
            return Err(Error::Invalid {
                op: "fd_check",
                msg: format!("f() must be a scalar, got {:?}", y.dims()),
            });
        }
        Ok(y.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
    };
    for v in vars {
        if v.dtype() != DType::F64 {
            return Err(Error::Invalid {
                op: "fd_check",
                msg: format!("variables must be f64, got {:?}", v.dtype()),
            });
        }
    }
    let grads = f()?.backward()?;
    let mut report = FdReport {
        worst: 0.0,
        at: (0, 0),
        values: (0.0, 0.0),
        checked: 0,
    };
    for (vi, v) in vars.iter().enumerate() {
        let n = v.elem_count();
        let analytic = match grads.get(v.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f64>()?,
            None => vec![0.0; n],
        };
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let set = |vals: &[f64]| -> Result<()> {
            Ok(v.set(&Tensor::from_slice(vals, v.shape(), v.device())?)?)
        };
        let mut p = base.clone();
        let result = (|| -> Result<()> {
            for i in 0..n {
                p[i] = base[i] + eps;
                set(&p)?;
                let lp = eval()?;
                p[i] = base[i] - eps;
                set(&p)?;
                let lm = eval()?;
                p[i] = base[i];
                let num = (lp - lm) / (2.0 * eps);
                let ana = analytic[i];
                let err = (num - ana).abs() / num.abs().max(ana.abs()).max(1e-3);
                if err > report.worst || !err.is_finite() {
                    report.worst = if err.is_finite() { err } else { f64::INFINITY };
                    report.at = (vi, i);
                    report.values = (ana, num);
                }
                report.checked += 1;
            }
            Ok(())
        })();
        set(&base)?;
        result?;
    }
    Ok(report)
}

/// [`fd_check`] that asserts the worst relative error is below `tol`, and returns the report.
///
/// # Panics
/// When the check fails or errors; the message gives the variable, element and both values.
pub fn assert_fd(vars: &[&Var], f: impl Fn() -> Result<Tensor>, eps: f64, tol: f64) -> FdReport {
    let r = fd_check(vars, f, eps).unwrap_or_else(|e| panic!("fd_check failed: {e}"));
    assert!(
        r.worst < tol,
        "gradient check: variable {} element {}: analytic {} vs numeric {} (relative error {:e} >= {tol:e})",
        r.at.0,
        r.at.1,
        r.values.0,
        r.values.1,
        r.worst
    );
    r
}
