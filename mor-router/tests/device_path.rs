//! The expert-choice device path (`routing_path = "device"`, what a GPU run takes) against
//! the host path on the CPU: the same selections (ties included), gates, losses, gradients
//! and statistics, with one host read per recursion step plus one per forward through
//! `route`, and one per forward through `route_device`.

use crate::common::*;
use candle_core::{Device, Tensor};
use mor_kernels::host_sync::Scope;
use mor_router::{RouteMode, Router, RouterOutput};

const D: usize = 4;
const NR: usize = 3;

/// Which of the five distinct rows token `t` of row `bi` carries.
fn class(bi: usize, t: usize) -> usize {
    (t * 7 + bi) % 5
}

/// `[b, l, D]` hidden states built from three distinct rows only, so that the router's
/// scores tie among many tokens of each row (the top-k must break ties by position).
fn tied_hidden(b: usize, l: usize) -> Tensor {
    let base = hidden(1, 5, D, 7).to_vec3::<f64>().unwrap()[0].clone();
    let mut v = Vec::with_capacity(b * l * D);
    for bi in 0..b {
        for t in 0..l {
            v.extend_from_slice(&base[class(bi, t)]);
        }
    }
    Tensor::from_vec(v, (b, l, D), &Device::Cpu).unwrap()
}

fn grads_of(router: &dyn Router, loss: &Tensor) -> Vec<Vec<f64>> {
    let g = loss.backward().unwrap();
    router
        .vars()
        .iter()
        .chain(router.aux_vars().iter())
        .map(|(_, v)| match g.get(v.as_tensor()) {
            Some(t) => t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => Vec::new(),
        })
        .collect()
}

/// The terms, statistics (gate sums to 1e-12), loss and router gradients of the two paths'
/// outputs are equal.
fn same_outputs(
    label: &str,
    host: &dyn Router,
    dev: &dyn Router,
    ho: &RouterOutput,
    dout: &RouterOutput,
) {
    assert_eq!(ho.terms, dout.terms, "{label}");
    let (mut hst, mut dst) = (ho.stats.clone(), dout.stats.clone());
    for (x, y) in hst.gate_sum.iter().zip(&dst.gate_sum) {
        assert!(
            (x - y).abs() <= 1e-12 * x.abs().max(1.0),
            "{label}: gate sums {x} vs {y}"
        );
    }
    hst.gate_sum.clear();
    dst.gate_sum.clear();
    assert_eq!(hst, dst, "{label}");
    match (&ho.loss, &dout.loss) {
        (Some(x), Some(y)) => {
            assert_eq!(x.to_scalar::<f64>().unwrap(), y.to_scalar::<f64>().unwrap());
            assert_eq!(grads_of(host, x), grads_of(dev, y), "{label}");
        }
        (None, None) => {}
        _ => panic!("{label}: one path has a loss, the other not"),
    }
}

/// Runs one forward on each path and compares everything the model and the trainer see.
fn same_on_both_paths(params: &str, mode: RouteMode, h: &Tensor) {
    let c = ctx(D, NR, h.dims()[1], 0.5, 11);
    let host = build(
        "expert_choice",
        &format!("{params}\nrouting_path = \"host\""),
        &c,
    );
    let dev = build(
        "expert_choice",
        &format!("{params}\nrouting_path = \"device\""),
        &c,
    );
    let (_, hs, ho) = forward(host.as_ref(), h, NR, mode).unwrap();
    let (_, ds, dout) = forward(dev.as_ref(), h, NR, mode).unwrap();
    for (r, (a, b)) in hs.iter().zip(&ds).enumerate() {
        assert_eq!(a.selected, b.selected, "{params} {mode:?}: step {}", r + 1);
        assert!(a.selected.iter().all(|s| !s.is_empty()));
        match (&a.gate, &b.gate) {
            (Some(x), Some(y)) => assert_eq!(
                x.to_vec1::<f64>().unwrap(),
                y.to_vec1::<f64>().unwrap(),
                "{params}: gates of step {}",
                r + 1
            ),
            (None, None) => {}
            _ => panic!("{params}: one path gated, the other not"),
        }
    }
    same_outputs(params, host.as_ref(), dev.as_ref(), &ho, &dout);
    match (&ho.aux_router_loss, &dout.aux_router_loss) {
        (Some(x), Some(y)) => {
            assert_eq!(x.to_scalar::<f64>().unwrap(), y.to_scalar::<f64>().unwrap());
            assert_eq!(
                grads_of(host.as_ref(), x),
                grads_of(dev.as_ref(), y),
                "{params}"
            );
        }
        (None, None) => {}
        _ => panic!("{params}: one path has an aux loss, the other not"),
    }
}

#[test]
fn device_path_selects_what_the_host_path_selects_ties_included() {
    let tied = tied_hidden(3, 12);
    let random = hidden(2, 10, D, 3);
    for params in [
        "",
        "z_loss = true",
        "sampling = \"aux_router\"",
        "router_func = \"tanh\"\ngating = \"additive\"",
        "rand_router = true",
        "capacity = [1.0, 0.5, 0.25]\nrouter_arch = \"mlp\"",
    ] {
        for h in [&tied, &random] {
            same_on_both_paths(params, RouteMode::Train, h);
            same_on_both_paths(params, RouteMode::FullSequence, h);
        }
    }
    same_on_both_paths("infer_rule = \"full_sequence\"", RouteMode::Causal, &tied);
    // The tied states do tie at the top-k boundary: some step keeps a token and drops a
    // candidate with the same hidden row (so the same score).
    let c = ctx(D, NR, 12, 0.5, 11);
    let r = build("expert_choice", "", &c);
    let (actives, steps, _) = forward(r.as_ref(), &tied, NR, RouteMode::Train).unwrap();
    let split = (0..NR).any(|s| {
        (0..3).any(|bi| {
            let kept = &steps[s].selected[bi];
            actives[s][bi].iter().any(|&t| {
                !kept.contains(&t)
                    && kept
                        .iter()
                        .any(|&q| class(bi, q as usize) == class(bi, t as usize))
            })
        })
    });
    assert!(split, "the tied states must exercise tie breaking");
}

/// A forward of `NR` steps on the device path reads the host `NR + 1` times (the kept
/// positions of each step, then the logged terms and statistics once); the host path
/// reads more, and `auto` on the CPU is the host path.
#[test]
fn device_path_reads_the_host_once_per_step_and_once_per_forward() {
    let h = hidden(2, 16, D, 5);
    let c = ctx(D, NR, 16, 0.5, 11);
    let reads = |path: &str| {
        let r = build(
            "expert_choice",
            &format!("z_loss = true\nrouting_path = \"{path}\""),
            &c,
        );
        let scope = Scope::start();
        let (_, _, out) = forward(r.as_ref(), &h, NR, RouteMode::Train).unwrap();
        assert_eq!(out.terms.len(), 2);
        let n = scope.counts();
        assert_eq!(n.device_to_host, 0, "CPU tensors are not transfers");
        n.reads
    };
    let device = reads("device");
    assert_eq!(device, NR as u64 + 1);
    let host = reads("host");
    assert!(host > 2 * NR as u64, "host path: {host} reads");
    assert_eq!(reads("auto"), host);
}

/// Token choice reads the host once per forward for the depths and once for the logged
/// terms (balance and z together), none per recursion step.
#[test]
fn token_choice_reads_the_host_twice_per_forward() {
    let h = hidden(2, 16, D, 5);
    let c = ctx(D, NR, 16, 0.5, 11);
    let r = build("token_choice", "z_loss = true", &c);
    let scope = Scope::start();
    let (_, _, out) = forward(r.as_ref(), &h, NR, RouteMode::Train).unwrap();
    let names: Vec<&str> = out.terms.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["balance", "z"]);
    assert_eq!(scope.counts().reads, 2);
    // The terms are the values of the loss parts.
    let want = out.loss.unwrap().to_scalar::<f64>().unwrap();
    let got = 0.1 * out.terms[0].1 + 1e-3 * out.terms[1].1;
    assert!((want - got).abs() <= 1e-12 * want.abs(), "{want} vs {got}");
}

/// One forward the way the model runs it on the device: every step first offered to
/// `route_device` with the active positions as a tensor, the host `route` (with the
/// positions read back) when it declines. Per step: the kept positions (read after the
/// forward, outside any count), the gate, and whether the step was decided on the device;
/// then the output and the depths of `finish_with_depths`.
#[allow(clippy::type_complexity)]
fn forward_on_device(
    router: &dyn Router,
    h: &Tensor,
    mode: RouteMode,
) -> (
    Vec<(Tensor, Option<Tensor>, bool)>,
    mor_router::RouterOutput,
    Option<Vec<u16>>,
) {
    let (b, l, _) = h.dims3().unwrap();
    assert!(router.routes_on_device(h.device()));
    let mut st = router.begin(h, mode).unwrap();
    let mut active = Tensor::from_vec(
        (0..l as u32).cycle().take(b * l).collect::<Vec<_>>(),
        (b, l),
        h.device(),
    )
    .unwrap();
    let mut steps = Vec::new();
    for step in 1..=NR {
        match router
            .route_device(step, h, &active, &mut st, mode)
            .unwrap()
        {
            Some(d) => {
                active = d.sel.clone();
                steps.push((d.sel, d.gate, true));
            }
            None => {
                let rows: Vec<Vec<u32>> = active.to_vec2().unwrap();
                let s = router.route(step, h, &rows, &mut st, mode).unwrap();
                let k = s.selected[0].len();
                assert!(s.selected.iter().all(|r| r.len() == k), "uniform rows");
                let flat: Vec<u32> = s.selected.concat();
                active = Tensor::from_vec(flat, (b, k), h.device()).unwrap();
                steps.push((active.clone(), s.gate, false));
            }
        }
    }
    let (out, depths) = router.finish_with_depths(st).unwrap();
    (steps, out, depths)
}

/// The device-tensor interface (`route_device`, `finish_with_depths`) decides what the host
/// path decides: the same kept positions, gates, losses, statistics and token depths; a
/// forward whose steps all stay on the device reads the host once (in `finish`); a causal
/// forward takes the host path for its capacity-1 step and the device for the others; a
/// threshold rule never takes the device path.
#[test]
fn route_device_keeps_positions_on_the_device_and_matches_the_host_path() {
    let tied = tied_hidden(3, 12);
    let random = hidden(2, 10, D, 3);
    let cases = [
        ("", RouteMode::Train, 0),
        ("z_loss = true", RouteMode::Train, 0),
        ("sampling = \"aux_router\"", RouteMode::FullSequence, 0),
        (
            "router_func = \"tanh\"\ngating = \"additive\"",
            RouteMode::Train,
            0,
        ),
        ("capacity = [0.75, 0.5, 0.25]", RouteMode::Train, 0),
        ("infer_rule = \"full_sequence\"", RouteMode::Causal, 1),
    ];
    for (params, mode, host_steps) in cases {
        for h in [&tied, &random] {
            let (b, l, _) = h.dims3().unwrap();
            let c = ctx(D, NR, l, 0.5, 11);
            let host = build(
                "expert_choice",
                &format!("{params}\nrouting_path = \"host\""),
                &c,
            );
            let dev = build(
                "expert_choice",
                &format!("{params}\nrouting_path = \"device\""),
                &c,
            );
            let (_, hs, ho) = forward(host.as_ref(), h, NR, mode).unwrap();
            let scope = Scope::start();
            let (ds, dout, depths) = forward_on_device(dev.as_ref(), h, mode);
            let reads = scope.counts().reads;
            // No read per device step; the host steps read their scores and gates.
            if host_steps == 0 {
                assert_eq!(reads, 1, "{params}: one read per forward");
            }
            let mut want_depth = vec![0u16; b * l];
            for (r, (a, (sel, gate, on_dev))) in hs.iter().zip(&ds).enumerate() {
                assert_eq!(
                    *on_dev,
                    r >= host_steps,
                    "{params} {mode:?}: step {}",
                    r + 1
                );
                let sel: Vec<Vec<u32>> = sel.to_vec2().unwrap();
                assert_eq!(a.selected, sel, "{params} {mode:?}: step {}", r + 1);
                for (bi, row) in sel.iter().enumerate() {
                    for &q in row {
                        want_depth[bi * l + q as usize] = r as u16 + 1;
                    }
                }
                match (&a.gate, gate) {
                    (Some(x), Some(y)) => assert_eq!(
                        x.to_vec1::<f64>().unwrap(),
                        y.to_vec1::<f64>().unwrap(),
                        "{params}: gates of step {}",
                        r + 1
                    ),
                    (None, None) => {}
                    _ => panic!("{params}: one path gated, the other not"),
                }
            }
            assert_eq!(depths, Some(want_depth), "{params} {mode:?}");
            same_outputs(
                &format!("{params} {mode:?}"),
                host.as_ref(),
                dev.as_ref(),
                &ho,
                &dout,
            );
        }
    }

    // Declined without touching the state: the threshold rule, `rand_router`, the host
    // path; the router then routes the same step on the host.
    let c = ctx(D, NR, 10, 0.5, 11);
    let h = hidden(2, 10, D, 3);
    let all = Tensor::from_vec(
        (0..10u32).cycle().take(20).collect::<Vec<_>>(),
        (2, 10),
        &Device::Cpu,
    )
    .unwrap();
    for (params, mode) in [
        ("routing_path = \"device\"", RouteMode::Causal),
        (
            "routing_path = \"device\"\nrand_router = true",
            RouteMode::Train,
        ),
        ("routing_path = \"host\"", RouteMode::Train),
    ] {
        let r = build("expert_choice", params, &c);
        let mut st = r.begin(&h, mode).unwrap();
        for step in 1..=2 {
            assert!(
                r.route_device(step, &h, &all, &mut st, mode)
                    .unwrap()
                    .is_none(),
                "{params}"
            );
        }
        let rows: Vec<Vec<u32>> = all.to_vec2().unwrap();
        r.route(1, &h, &rows, &mut st, mode).unwrap();
        let (_, depths) = r.finish_with_depths(st).unwrap();
        assert_eq!(depths, None, "{params}: no device step, no depths");
    }
    // A malformed active set is an error, not a panic.
    let r = build("expert_choice", "routing_path = \"device\"", &c);
    let mut st = r.begin(&h, RouteMode::Train).unwrap();
    let bad = Tensor::zeros((3, 4), candle_core::DType::U32, &Device::Cpu).unwrap();
    let e = r
        .route_device(1, &h, &bad, &mut st, RouteMode::Train)
        .unwrap_err();
    assert!(
        e.to_string().contains("`active` must be [2, c <= 10] u32"),
        "{e}"
    );
}

/// `finish_pending` leaves the logged values of a device-routed forward on the device: the
/// whole forward reads nothing, and the values of two forwards read together in one read
/// (`pending_values`, `apply_pending`) give what `finish_with_depths` gives each; a read
/// of the wrong length is an error.
#[test]
fn finish_pending_reads_nothing_and_resolves_to_what_finish_reads() {
    let h = hidden(2, 12, D, 5);
    let c = ctx(D, NR, 12, 0.5, 11);
    let params = "z_loss = true\nrouting_path = \"device\"\ncapacity = [0.75, 0.5, 0.25]";
    let run = |pending: bool| {
        let r = build("expert_choice", params, &c);
        let mode = RouteMode::Train;
        let mut st = r.begin(&h, mode).unwrap();
        let mut active = Tensor::from_vec(
            (0..12u32).cycle().take(24).collect::<Vec<_>>(),
            (2, 12),
            &Device::Cpu,
        )
        .unwrap();
        for step in 1..=NR {
            active = r
                .route_device(step, &h, &active, &mut st, mode)
                .unwrap()
                .unwrap()
                .sel;
        }
        if pending {
            (r.finish_pending(st).unwrap(), None)
        } else {
            r.finish_with_depths(st).unwrap()
        }
    };
    let (want, want_depths) = run(false);
    assert!(want.pending.is_empty());
    let scope = Scope::start();
    let mut outs = [run(true).0, run(true).0];
    assert_eq!(scope.counts().reads, 0, "no read before the caller's");
    let slots: Vec<_> = outs[0].pending.slots().cloned().collect();
    use mor_router::LogSlot;
    assert_eq!(
        slots,
        [
            LogSlot::Term("bce".into()),
            LogSlot::Term("z".into()),
            LogSlot::GateSum(0),
            LogSlot::SamplingCorrect(0),
            LogSlot::GateSum(1),
            LogSlot::SamplingCorrect(1),
            LogSlot::GateSum(2),
            LogSlot::SamplingCorrect(2),
            LogSlot::DepthHistogram,
            LogSlot::LastStepPerPosition,
        ]
    );
    assert!(outs[0].terms.is_empty() && outs[0].pending.has_depths());
    // The pending values hold no autograd graph (the loss does).
    assert!(!outs[0].pending_values(true).unwrap().unwrap().track_op());
    assert!(outs[0].loss.as_ref().unwrap().track_op());
    // Both forwards' values (the depths of the second too) in one read.
    let parts: Vec<Tensor> = [
        outs[0].pending_values(false).unwrap().unwrap(),
        outs[1].pending_values(true).unwrap().unwrap(),
    ]
    .into();
    let n0 = parts[0].elem_count();
    let scope = Scope::start();
    let values = mor_kernels::host_sync::to_host_f64(&Tensor::cat(&parts, 0).unwrap()).unwrap();
    assert_eq!(scope.counts().reads, 1);
    assert!(outs[0]
        .apply_pending(&values[..n0 - 1], false)
        .unwrap_err()
        .to_string()
        .contains("values read for"));
    assert_eq!(outs[0].apply_pending(&values[..n0], false).unwrap(), None);
    let depths = outs[1].apply_pending(&values[n0..], true).unwrap();
    assert_eq!(depths, want_depths);
    assert!(
        want_depths.unwrap().contains(&0),
        "capacity 0.75 leaves tokens at depth 0"
    );
    for out in &outs {
        assert!(out.pending.is_empty());
        assert_eq!(out.terms, want.terms);
        assert_eq!(out.stats, want.stats);
    }
    assert_eq!(want.stats.tokens_depth_zero, 2 * 3);
}
