//! The CUDA layer as data: one table of every kernel ([`KERNELS`]: name, module, parameter
//! list) and, per op, a [`Plan`] of launches (the kernels to run, their grids, the buffers
//! they write and the argument of every parameter). One generic executor (`execute` in
//! `enabled.rs`) runs any plan; no op has hand-written launch code.
//!
//! Plans are plain Rust, built from shapes alone, so each op's plan is validated on machines
//! without a GPU ([`Plan::validate`]): every argument matches the kind of its parameter in
//! the table, written ranges stay inside their buffers, the output buffer holds the output
//! shape. The table itself is checked against the `extern "C"` declarations of
//! `kernels/*.cu` by a test.

use super::launch::{self, LaunchDims};
use super::module::KernelModule;
use crate::{Error, Result};
use candle_core::{DType, Shape, Tensor};
use std::ops::Range;

/// Element type of a kernel pointer parameter or of a plan buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// The op's element type (`T` in the kernel source: f32 or bf16).
    T,
    /// Always f32 (accumulators, partial sums).
    F32,
    /// u32 (indices, positions).
    U32,
}

/// One parameter of a kernel, in the order of its C signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// `const X*`, read.
    In(Elem),
    /// `const X*` that may be null (an optional input).
    OptIn(Elem),
    /// `X*`, written (and possibly read).
    Out(Elem),
    /// `unsigned int`.
    U32,
    /// `int`.
    I32,
    /// `float`.
    F32,
    /// `unsigned long long`.
    U64,
    /// `double`.
    F64,
}

/// Every kernel of `kernels/*.cu`, the index of its row in [`KERNELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `mor_router_score`.
    RouterScore,
    /// `mor_topk_sorted`.
    TopkSorted,
    /// `mor_rms_norm_fwd`.
    RmsNormFwd,
    /// `mor_rms_norm_bwd`.
    RmsNormBwd,
    /// `mor_rope_at`.
    RopeAt,
    /// `mor_gather_rope_fwd`.
    GatherRopeFwd,
    /// `mor_gather_rope_bwd`.
    GatherRopeBwd,
    /// `mor_swiglu_fwd`.
    SwigluFwd,
    /// `mor_swiglu_bwd`.
    SwigluBwd,
    /// `mor_gather_rows`.
    GatherRows,
    /// `mor_index_add_rows`.
    IndexAddRows,
    /// `mor_scatter_add_bwd`.
    ScatterAddBwd,
    /// `mor_paged_decode_partial`.
    PagedDecodePartial,
    /// `mor_paged_decode_combine`.
    PagedDecodeCombine,
    /// `mor_flash_attn_fwd`.
    FlashAttnFwd,
    /// `mor_flash_attn_bwd_dq`.
    FlashAttnBwdDq,
    /// `mor_flash_attn_bwd_dkv`.
    FlashAttnBwdDkv,
    /// `mor_ce_chunk_stats`.
    CeChunkStats,
    /// `mor_ce_chunk_grad`.
    CeChunkGrad,
    /// `mor_adamw_step`.
    AdamwStep,
}

/// One row of the kernel table.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    /// The kernel.
    pub kernel: Kernel,
    /// Its name without the dtype suffix (`<base>_f32`, `<base>_bf16` exist).
    pub base: &'static str,
    /// The module (source file) that defines it.
    pub module: KernelModule,
    /// Its parameters, in order.
    pub params: &'static [Param],
}

use Elem::{F32 as EF, T as ET, U32 as EU};
use Param::{In, OptIn, Out, F32, F64, I32, U32, U64};

/// `mor_gather_rope_fwd` and `_bwd`: `(x or dout, idx, cos, sin, out, b, h, l, t, dh,
/// max_pos)`.
const GATHER_ROPE: &[Param] = &[
    In(ET),
    In(EU),
    In(ET),
    In(ET),
    Out(ET),
    U32,
    U32,
    U32,
    U32,
    U32,
    U32,
];

/// `mor_flash_attn_bwd_dq` and `_dkv`: `(q, k, v, q_pos, k_pos, dout, stats, out, hq, hkv,
/// t, s, dh, scale)`.
const FLASH_BWD: &[Param] = &[
    In(ET),
    In(ET),
    In(ET),
    In(EU),
    In(EU),
    In(EF),
    In(EF),
    Out(EF),
    U32,
    U32,
    U32,
    U32,
    U32,
    F32,
];

/// The kernel table, in the order of [`Kernel`].
pub static KERNELS: [KernelSpec; 20] = [
    KernelSpec {
        kernel: Kernel::RouterScore,
        base: "mor_router_score",
        module: KernelModule::Router,
        params: &[In(ET), In(ET), Out(EF), U32, U32, F32, F32, I32],
    },
    KernelSpec {
        kernel: Kernel::TopkSorted,
        base: "mor_topk_sorted",
        module: KernelModule::Router,
        params: &[In(ET), OptIn(EU), Out(EU), Out(EU), U32, U32],
    },
    KernelSpec {
        kernel: Kernel::RmsNormFwd,
        base: "mor_rms_norm_fwd",
        module: KernelModule::RmsNorm,
        params: &[In(ET), In(ET), Out(ET), U32, U32, F32],
    },
    KernelSpec {
        kernel: Kernel::RmsNormBwd,
        base: "mor_rms_norm_bwd",
        module: KernelModule::RmsNorm,
        params: &[In(ET), In(ET), In(ET), Out(EF), Out(EF), U32, U32, F32],
    },
    KernelSpec {
        kernel: Kernel::RopeAt,
        base: "mor_rope_at",
        module: KernelModule::Rope,
        params: &[
            In(ET),
            In(EU),
            In(ET),
            In(ET),
            Out(ET),
            U32,
            U32,
            U32,
            U32,
            U32,
            F32,
        ],
    },
    KernelSpec {
        kernel: Kernel::GatherRopeFwd,
        base: "mor_gather_rope_fwd",
        module: KernelModule::Rope,
        params: GATHER_ROPE,
    },
    KernelSpec {
        kernel: Kernel::GatherRopeBwd,
        base: "mor_gather_rope_bwd",
        module: KernelModule::Rope,
        params: GATHER_ROPE,
    },
    KernelSpec {
        kernel: Kernel::SwigluFwd,
        base: "mor_swiglu_fwd",
        module: KernelModule::Swiglu,
        params: &[In(ET), In(ET), Out(ET), U64],
    },
    KernelSpec {
        kernel: Kernel::SwigluBwd,
        base: "mor_swiglu_bwd",
        module: KernelModule::Swiglu,
        params: &[In(ET), In(ET), In(ET), Out(ET), U64],
    },
    KernelSpec {
        kernel: Kernel::GatherRows,
        base: "mor_gather_rows",
        module: KernelModule::Tokens,
        params: &[In(ET), In(EU), Out(ET), U32, U32, U32, U32],
    },
    KernelSpec {
        kernel: Kernel::IndexAddRows,
        base: "mor_index_add_rows",
        module: KernelModule::Tokens,
        params: &[Out(ET), In(EU), In(ET), OptIn(ET), U32, U32, U32, U32, I32],
    },
    KernelSpec {
        kernel: Kernel::ScatterAddBwd,
        base: "mor_scatter_add_bwd",
        module: KernelModule::Tokens,
        params: &[In(ET), In(EU), In(ET), In(ET), Out(ET), U32, U32, U32, U32],
    },
    KernelSpec {
        kernel: Kernel::PagedDecodePartial,
        base: "mor_paged_decode_partial",
        module: KernelModule::DecodeAttention,
        params: &[
            In(ET),
            In(ET),
            In(ET),
            In(EU),
            In(EU),
            Out(EF),
            U32,
            U32,
            U32,
            U32,
            U32,
            U32,
            U32,
            F32,
        ],
    },
    KernelSpec {
        kernel: Kernel::PagedDecodeCombine,
        base: "mor_paged_decode_combine",
        module: KernelModule::DecodeAttention,
        params: &[In(EF), Out(ET), U32, U32, U32],
    },
    KernelSpec {
        kernel: Kernel::FlashAttnFwd,
        base: "mor_flash_attn_fwd",
        module: KernelModule::FlashAttention,
        params: &[
            In(ET),
            In(ET),
            In(ET),
            In(EU),
            In(EU),
            Out(EF),
            U32,
            U32,
            U32,
            U32,
            U32,
            F32,
        ],
    },
    KernelSpec {
        kernel: Kernel::FlashAttnBwdDq,
        base: "mor_flash_attn_bwd_dq",
        module: KernelModule::FlashAttention,
        params: FLASH_BWD,
    },
    KernelSpec {
        kernel: Kernel::FlashAttnBwdDkv,
        base: "mor_flash_attn_bwd_dkv",
        module: KernelModule::FlashAttention,
        params: FLASH_BWD,
    },
    KernelSpec {
        kernel: Kernel::CeChunkStats,
        base: "mor_ce_chunk_stats",
        module: KernelModule::CrossEntropy,
        params: &[In(ET), In(EU), Out(EF), U32, U32, U32],
    },
    KernelSpec {
        kernel: Kernel::CeChunkGrad,
        base: "mor_ce_chunk_grad",
        module: KernelModule::CrossEntropy,
        params: &[In(ET), In(EU), In(EF), In(EF), Out(ET), U32, U32, U32],
    },
    KernelSpec {
        kernel: Kernel::AdamwStep,
        base: "mor_adamw_step",
        module: KernelModule::Adamw,
        params: &[
            In(ET),
            In(ET),
            In(ET),
            In(ET),
            Out(ET),
            U64,
            F64,
            F64,
            F64,
            F64,
            F64,
            F64,
            F64,
            F64,
            F64,
        ],
    },
];

impl Kernel {
    /// The kernel's row of [`KERNELS`].
    pub fn spec(self) -> &'static KernelSpec {
        &KERNELS[self as usize]
    }
}

/// The kernels of `module`, in table order.
pub fn kernels_of(module: KernelModule) -> Vec<&'static str> {
    KERNELS
        .iter()
        .filter(|k| k.module == module)
        .map(|k| k.base)
        .collect()
}

/// The value passed for one kernel parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// The op's `i`-th input (element type `T`, contiguous).
    Input(usize),
    /// The plan's `i`-th auxiliary tensor ([`Plan::aux`]): u32 indices or `T` weights.
    Aux(usize),
    /// A null pointer, for an [`Param::OptIn`].
    Null,
    /// Elements `range` of buffer `b`, written by the kernel.
    Write(usize, Range<usize>),
    /// The whole of buffer `b`, read (written by an earlier launch of the plan).
    Read(usize),
    /// An `unsigned int`.
    U32(u32),
    /// An `int`.
    I32(i32),
    /// A `float`.
    F32(f32),
    /// An `unsigned long long`.
    U64(u64),
    /// A `double`.
    F64(f64),
}

/// A zero-initialised device buffer of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Element type.
    pub elem: Elem,
    /// Length in elements.
    pub len: usize,
}

/// One kernel launch of a plan.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The kernel.
    pub kernel: Kernel,
    /// Grid, block and dynamic shared memory.
    pub dims: LaunchDims,
    /// One argument per parameter of the kernel.
    pub args: Vec<Arg>,
}

/// How one op runs on the device: buffers to allocate, inputs to copy into buffers, the
/// launches in order, and which buffer is the output.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The op, for error messages.
    pub op: &'static str,
    /// How many inputs the op takes.
    pub inputs: usize,
    /// Tensors the kernels read besides the inputs (indices, optional weights), on the
    /// inputs' device.
    pub aux: Vec<Tensor>,
    /// Buffers, zero-initialised.
    pub buffers: Vec<Buffer>,
    /// `(input, buffer)`: the input is copied into the buffer before the first launch.
    pub copies: Vec<(usize, usize)>,
    /// The launches, run in order on the device's stream.
    pub launches: Vec<Launch>,
    /// The buffer returned as the op's output.
    pub output: usize,
    /// The output shape.
    pub shape: Shape,
}

fn invalid(op: &'static str, msg: String) -> Error {
    Error::Invalid { op, msg }
}

impl Plan {
    /// An empty plan of an op with `inputs` inputs and output shape `shape`; the output
    /// buffer is set by [`Plan::output`].
    pub fn new(op: &'static str, inputs: usize, shape: impl Into<Shape>) -> Self {
        Plan {
            op,
            inputs,
            aux: Vec::new(),
            buffers: Vec::new(),
            copies: Vec::new(),
            launches: Vec::new(),
            output: 0,
            shape: shape.into(),
        }
    }

    /// Adds an auxiliary tensor and returns its argument.
    pub fn aux(&mut self, t: &Tensor) -> Arg {
        self.aux.push(t.clone());
        Arg::Aux(self.aux.len() - 1)
    }

    /// Adds a zeroed buffer of `len` elements and returns its index.
    pub fn buffer(&mut self, elem: Elem, len: usize) -> usize {
        self.buffers.push(Buffer { elem, len });
        self.buffers.len() - 1
    }

    /// The whole of buffer `b`, written.
    pub fn write_all(&self, b: usize) -> Arg {
        Arg::Write(b, 0..self.buffers.get(b).map_or(0, |x| x.len))
    }

    /// Appends a launch.
    pub fn launch(&mut self, kernel: Kernel, dims: LaunchDims, args: Vec<Arg>) {
        self.launches.push(Launch { kernel, dims, args });
    }

    /// Sets the output buffer and returns the plan.
    pub fn output(mut self, b: usize) -> Self {
        self.output = b;
        self
    }

    /// A size as a `u32` kernel argument, or an error naming it.
    pub fn u32_arg(&self, what: &str, v: usize) -> Result<Arg> {
        Ok(Arg::U32(launch::to_u32(self.op, what, v)?))
    }

    /// Checks the plan against the kernel table for inputs of element dtype `dtype`:
    /// every launch has one argument per parameter of the matching kind, written ranges
    /// lie inside their buffers, a buffer written twice by one launch is split in exactly
    /// two halves that tile it, no launch reads a buffer it writes, copies go into buffers
    /// of the element type, and the output buffer holds exactly the output shape.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the op, the kernel and the argument.
    pub fn validate(&self, dtype: DType) -> Result<()> {
        let op = self.op;
        let nb = self.buffers.len();
        let out = self
            .buffers
            .get(self.output)
            .ok_or_else(|| invalid(op, format!("output buffer {} of {nb}", self.output)))?;
        if out.len != self.shape.elem_count() {
            return Err(invalid(
                op,
                format!(
                    "the output buffer holds {} elements, the shape {:?} {}",
                    out.len,
                    self.shape.dims(),
                    self.shape.elem_count()
                ),
            ));
        }
        for &(i, b) in &self.copies {
            if i >= self.inputs || self.buffers.get(b).map(|x| x.elem) != Some(Elem::T) {
                return Err(invalid(op, format!("copy of input {i} into buffer {b}")));
            }
        }
        if self.launches.is_empty() {
            return Err(invalid(op, "the plan launches nothing".into()));
        }
        for l in &self.launches {
            self.validate_launch(l, dtype)?;
        }
        Ok(())
    }

    fn validate_launch(&self, l: &Launch, dtype: DType) -> Result<()> {
        let spec = l.kernel.spec();
        let bad = |i: usize, msg: String| {
            invalid(
                self.op,
                format!("{} argument {i} ({:?}): {msg}", spec.base, l.args.get(i)),
            )
        };
        if l.args.len() != spec.params.len() {
            return Err(invalid(
                self.op,
                format!(
                    "{} takes {} arguments, the plan passes {}",
                    spec.base,
                    spec.params.len(),
                    l.args.len()
                ),
            ));
        }
        if l.dims.blocks() == 0 || l.dims.threads_per_block() == 0 {
            return Err(invalid(self.op, format!("{}: an empty launch", spec.base)));
        }
        let mut writes: Vec<Vec<Range<usize>>> = vec![Vec::new(); self.buffers.len()];
        let mut reads = vec![false; self.buffers.len()];
        for (i, (a, p)) in l.args.iter().zip(spec.params).enumerate() {
            let mut ptr_elem = |e: Elem| -> Result<Elem> {
                match a {
                    Arg::Input(j) if *j < self.inputs => Ok(Elem::T),
                    Arg::Aux(j) => match self.aux.get(*j).map(|t| t.dtype()) {
                        Some(DType::U32) => Ok(Elem::U32),
                        // An f32 tensor passed where an f32 pointer is expected (for f32
                        // ops that is also the element type).
                        Some(DType::F32) if e == Elem::F32 => Ok(Elem::F32),
                        Some(d) if d == dtype => Ok(Elem::T),
                        other => Err(bad(i, format!("aux tensor of dtype {other:?}"))),
                    },
                    Arg::Read(b) if *b < self.buffers.len() => {
                        reads[*b] = true;
                        Ok(self.buffers[*b].elem)
                    }
                    _ => Err(bad(i, format!("expected a {e:?} input"))),
                }
            };
            let ok = match (p, a) {
                (Param::OptIn(_), Arg::Null) => true,
                (Param::In(e) | Param::OptIn(e), _) => ptr_elem(*e)? == *e,
                (Param::Out(e), Arg::Write(b, r)) => {
                    let buf = self
                        .buffers
                        .get(*b)
                        .ok_or_else(|| bad(i, "no such buffer".into()))?;
                    if r.start > r.end || r.end > buf.len || r.is_empty() {
                        return Err(bad(i, format!("range outside a buffer of {}", buf.len)));
                    }
                    writes[*b].push(r.clone());
                    buf.elem == *e
                }
                (Param::U32, Arg::U32(_))
                | (Param::I32, Arg::I32(_))
                | (Param::F32, Arg::F32(_))
                | (Param::U64, Arg::U64(_))
                | (Param::F64, Arg::F64(_)) => true,
                _ => false,
            };
            if !ok {
                return Err(bad(i, format!("does not match the parameter {p:?}")));
            }
        }
        for (b, w) in writes.iter_mut().enumerate() {
            if w.is_empty() {
                continue;
            }
            if reads[b] {
                return Err(invalid(
                    self.op,
                    format!("{} reads and writes buffer {b}", spec.base),
                ));
            }
            w.sort_by_key(|r| r.start);
            let len = self.buffers[b].len;
            let tiled =
                w.len() == 2 && w[0].start == 0 && w[0].end == w[1].start && w[1].end == len;
            if w.len() > 2 || (w.len() == 2 && !tiled) {
                return Err(invalid(
                    self.op,
                    format!(
                        "{} writes buffer {b} in {w:?}: two writes must be halves that tile it",
                        spec.base
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter kind of one C parameter declaration of a kernel source.
    fn c_param(decl: &str, nullable: bool) -> Param {
        let decl = decl.split_whitespace().collect::<Vec<_>>();
        // Drop the parameter name.
        let ty = decl[..decl.len() - 1].join(" ");
        let elem = |t: &str| match t {
            "T" => ET,
            "float" => EF,
            "unsigned int" => EU,
            other => panic!("unknown pointee {other}"),
        };
        if let Some(p) = ty.strip_suffix('*') {
            let p = p.trim();
            match p.strip_prefix("const ") {
                Some(e) if nullable => OptIn(elem(e)),
                Some(e) => In(elem(e)),
                None => Out(elem(p)),
            }
        } else {
            match ty.as_str() {
                "unsigned int" => U32,
                "int" => I32,
                "float" => F32,
                "unsigned long long" => U64,
                "double" => F64,
                other => panic!("unknown parameter type {other}"),
            }
        }
    }

    /// The parameters of `<base>_##SUFFIX(...)` in the source of its module.
    fn source_params(spec: &KernelSpec) -> Vec<Param> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("kernels")
            .join(format!("{}.cu", spec.module.name()));
        let src = std::fs::read_to_string(&path).unwrap().replace('\\', " ");
        let start = src
            .find(&format!("void {}_##SUFFIX(", spec.base))
            .unwrap_or_else(|| panic!("{} not in {}", spec.base, path.display()));
        let open = start + src[start..].find('(').unwrap() + 1;
        let close = open + src[open..].find(')').unwrap();
        src[open..close]
            .split(',')
            .enumerate()
            .map(|(i, d)| {
                // The optional pointers: the candidate map of top-k, the weights of the
                // index-add (documented in the sources as "may be null").
                let nullable = matches!(
                    (spec.kernel, i),
                    (Kernel::TopkSorted, 1) | (Kernel::IndexAddRows, 3)
                );
                c_param(d, nullable)
            })
            .collect()
    }

    #[test]
    fn the_table_matches_the_kernel_sources() {
        for (i, spec) in KERNELS.iter().enumerate() {
            assert_eq!(spec.kernel as usize, i, "{} is out of order", spec.base);
            assert_eq!(spec.kernel.spec().base, spec.base);
            assert_eq!(
                source_params(spec),
                spec.params,
                "{} in {}.cu",
                spec.base,
                spec.module
            );
        }
        for m in KernelModule::ALL {
            assert!(!kernels_of(m).is_empty(), "{m} has no kernel");
        }
        assert_eq!(
            kernels_of(KernelModule::Router),
            ["mor_router_score", "mor_topk_sorted"]
        );
    }

    fn dims() -> LaunchDims {
        launch::elementwise(10).unwrap()
    }

    fn plan_with(args: Vec<Arg>, kernel: Kernel, buffers: &[(Elem, usize)]) -> Plan {
        let mut p = Plan::new("test", 2, 4);
        for &(e, n) in buffers {
            p.buffer(e, n);
        }
        p.launch(kernel, dims(), args);
        p
    }

    #[test]
    fn validation_rejects_mismatched_arguments() {
        let good = vec![
            Arg::Input(0),
            Arg::Input(1),
            Arg::Write(0, 0..4),
            Arg::U32(2),
            Arg::U32(2),
            Arg::F32(1e-5),
        ];
        plan_with(good.clone(), Kernel::RmsNormFwd, &[(ET, 4)])
            .validate(DType::F32)
            .unwrap();
        let cases: Vec<(Vec<Arg>, &[(Elem, usize)], &str)> = vec![
            (good[..5].to_vec(), &[(ET, 4)], "takes 6 arguments"),
            (
                {
                    let mut a = good.clone();
                    a[5] = Arg::U32(1);
                    a
                },
                &[(ET, 4)],
                "does not match",
            ),
            (
                {
                    let mut a = good.clone();
                    a[2] = Arg::Write(0, 0..5);
                    a
                },
                &[(ET, 4)],
                "range outside",
            ),
            (good.clone(), &[(EF, 4)], "does not match"),
            (good.clone(), &[(ET, 3)], "output buffer holds 3"),
            (
                {
                    let mut a = good.clone();
                    a[0] = Arg::Input(2);
                    a
                },
                &[(ET, 4)],
                "expected a T input",
            ),
            (
                {
                    let mut a = good.clone();
                    a[1] = Arg::Null;
                    a
                },
                &[(ET, 4)],
                "expected a T input",
            ),
        ];
        for (args, bufs, want) in cases {
            let err = plan_with(args, Kernel::RmsNormFwd, bufs)
                .validate(DType::F32)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn two_writes_into_one_buffer_must_tile_it() {
        let args = |a: Range<usize>, b: Range<usize>| {
            vec![
                Arg::Input(0),
                Arg::Null,
                Arg::Write(0, a),
                Arg::Write(0, b),
                Arg::U32(4),
                Arg::U32(2),
            ]
        };
        plan_with(args(0..2, 2..4), Kernel::TopkSorted, &[(EU, 4)])
            .validate(DType::F32)
            .unwrap();
        for (a, b) in [(0..2, 1..4), (0..1, 2..4), (0..3, 3..4)] {
            let p = plan_with(args(a.clone(), b.clone()), Kernel::TopkSorted, &[(EU, 4)]);
            let ok = p.validate(DType::F32);
            assert_eq!(ok.is_ok(), a.end == b.start && b.end == 4, "{a:?} {b:?}");
        }
        // A launch must not read the buffer it writes.
        let mut p = Plan::new("test", 0, 4);
        let o = p.buffer(ET, 4);
        let idx = p.aux(&Tensor::zeros(2, DType::U32, &candle_core::Device::Cpu).unwrap());
        let mut args = vec![
            Arg::Write(o, 0..4),
            idx,
            Arg::Input(0),
            Arg::Null,
            Arg::U32(1),
            Arg::U32(2),
            Arg::U32(1),
            Arg::U32(2),
            Arg::I32(0),
        ];
        p.inputs = 1;
        p.launch(Kernel::IndexAddRows, dims(), args.clone());
        p.clone().output(o).validate(DType::F32).unwrap();
        args[2] = Arg::Read(o);
        p.launches[0].args = args;
        let err = p.output(o).validate(DType::F32).unwrap_err().to_string();
        assert!(err.contains("reads and writes buffer 0"), "{err}");
    }
}
