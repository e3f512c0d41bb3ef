//! Token choice on the device path (`routing_path = "device"`, what a GPU run takes)
//! against the host path on the CPU: the same depths, subsets (selected positions, then
//! the same padding), gates, finishing flags, losses, gradients and statistics, with no
//! host read in the forward.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use mor_kernels::host_sync::Scope;
use mor_router::token_choice::BIAS_BUFFER;
use mor_router::{RouteMode, Router, Update};

const D: usize = 4;
const NR: usize = 3;

fn grads_of(router: &dyn Router, loss: &Tensor) -> Vec<Vec<f64>> {
    let g = loss.backward().unwrap();
    router
        .vars()
        .iter()
        .map(|(_, v)| {
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// Builds the router on `path`, with the loss-free bias set to `bias` when given.
fn router(params: &str, path: &str, l: usize, bias: Option<[f64; NR]>) -> Box<dyn Router> {
    let c = ctx(D, NR, l, 0.5, 11);
    let r = build(
        "token_choice",
        &format!("{params}\nrouting_path = \"{path}\""),
        &c,
    );
    if let Some(b) = bias {
        let t = Tensor::new(&b, &Device::Cpu).unwrap();
        r.load_buffers(&[(BIAS_BUFFER.to_string(), t)]).unwrap();
    }
    r
}

/// One forward on both paths; everything the model and the trainer see is compared.
fn same_on_both_paths(params: &str, mode: RouteMode, h: &Tensor, bias: Option<[f64; NR]>) {
    let (b, l, _) = h.dims3().unwrap();
    let label = format!("{params} {mode:?} {bias:?}");
    let host = router(params, "host", l, bias);
    let dev = router(params, "device", l, bias);
    assert!(!host.routes_on_device(&Device::Cpu) && dev.routes_on_device(&Device::Cpu));
    let (_, hs, ho) = forward(host.as_ref(), h, NR, mode).unwrap();

    let scope = Scope::start();
    let mut st = dev.begin(h, mode).unwrap();
    let mut active = Tensor::from_vec(
        (0..l as u32).cycle().take(b * l).collect::<Vec<_>>(),
        (b, l),
        &Device::Cpu,
    )
    .unwrap();
    let mut steps = Vec::new();
    for step in 1..=NR {
        let d = dev
            .route_device(step, h, &active, &mut st, mode)
            .unwrap()
            .expect("the device path routes every step");
        active = d.sel.clone();
        steps.push(d);
    }
    let mut dout = dev.finish_pending(st).unwrap();
    assert_eq!(
        scope.counts().reads,
        0,
        "{label}: no host read in the forward"
    );
    let depths = dout.resolve(true).unwrap().expect("depths");
    assert_eq!(scope.counts().reads, 1);

    let mut want_depth = vec![0u16; b * l];
    for (r, (hstep, d)) in hs.iter().zip(&steps).enumerate() {
        let sel: Vec<Vec<u32>> = d.sel.to_vec2().unwrap();
        let valid: Vec<Vec<u8>> = match &d.valid {
            Some(v) => v.to_vec2().unwrap(),
            None => vec![vec![1; l]; b],
        };
        assert_eq!(
            r == 0,
            d.valid.is_none(),
            "{label}: only step 1 is unpadded"
        );
        let fin: Vec<Vec<u8>> = d.finishing.as_ref().unwrap().to_vec2().unwrap();
        let gate: Vec<f64> = d.gate.as_ref().unwrap().to_vec1().unwrap();
        let Update::TokenChoice {
            finishing: host_fin,
            gate_intermediate,
        } = &hstep.update
        else {
            panic!("token choice")
        };
        assert!(
            matches!(&d.update, Update::TokenChoice { gate_intermediate: g, .. } if g == gate_intermediate)
        );
        let host_gate: Vec<f64> = hstep.gate.as_ref().unwrap().to_vec1().unwrap();
        let (mut hg, mut hf) = (host_gate.iter(), host_fin.iter());
        for bi in 0..b {
            let chosen = &hstep.selected[bi];
            let n = chosen.len();
            // The selected positions, then the row's other positions: the host's padding.
            let pads: Vec<u32> = (0..l as u32).filter(|p| !chosen.contains(p)).collect();
            assert_eq!(&sel[bi][..n], &chosen[..], "{label}: step {}", r + 1);
            assert_eq!(
                &sel[bi][n..],
                &pads[..],
                "{label}: padding of step {}",
                r + 1
            );
            for j in 0..l {
                let on = j < n;
                assert_eq!(valid[bi][j] == 1, on, "{label}");
                let g = gate[bi * l + j];
                if on {
                    assert_eq!(g, *hg.next().unwrap(), "{label}: gate");
                    assert_eq!(fin[bi][j] == 1, *hf.next().unwrap(), "{label}: finishing");
                    want_depth[bi * l + sel[bi][j] as usize] = r as u16 + 1;
                } else {
                    assert_eq!((g, fin[bi][j]), (0.0, 0), "{label}: padding");
                }
            }
        }
    }
    assert_eq!(depths, want_depth, "{label}");
    assert_eq!(ho.terms, dout.terms, "{label}");
    let (mut x, mut y) = (ho.stats.clone(), dout.stats.clone());
    // f64 sums of the same values in another order.
    for (p, q) in x
        .gate_sum
        .iter()
        .zip(&y.gate_sum)
        .chain(x.prob_sum.iter().zip(&y.prob_sum))
    {
        assert!(
            (p - q).abs() <= 1e-12 * p.abs().max(1.0),
            "{label}: {p} vs {q}"
        );
    }
    for s in [&mut x, &mut y] {
        s.gate_sum.clear();
        s.prob_sum.clear();
    }
    assert_eq!(x, y, "{label}");
    match (&ho.loss, &dout.loss) {
        (Some(p), Some(q)) => {
            assert_eq!(p.to_scalar::<f64>().unwrap(), q.to_scalar::<f64>().unwrap());
            assert_eq!(
                grads_of(host.as_ref(), p),
                grads_of(dev.as_ref(), q),
                "{label}"
            );
        }
        (None, None) => {}
        _ => panic!("{label}: one path has a loss, the other not"),
    }
    // The gates' gradients too (the model's merge multiplies by them).
    let gsum = |steps: &[Option<Tensor>]| {
        let parts: Vec<Tensor> = steps
            .iter()
            .map(|g| g.clone().unwrap().sqr().unwrap().sum_all().unwrap())
            .collect();
        Tensor::stack(&parts, 0).unwrap().sum_all().unwrap()
    };
    if !host.vars().is_empty() {
        let hg = gsum(&hs.iter().map(|s| s.gate.clone()).collect::<Vec<_>>());
        let dg = gsum(&steps.iter().map(|s| s.gate.clone()).collect::<Vec<_>>());
        let (hg, dg) = (grads_of(host.as_ref(), &hg), grads_of(dev.as_ref(), &dg));
        for (a, c) in hg.iter().flatten().zip(dg.iter().flatten()) {
            assert!(
                (a - c).abs() <= 1e-12 * a.abs().max(1e-300),
                "{label}: gate gradient {a} vs {c}"
            );
        }
    }
}

/// Every variant of the router routes the same on both paths: softmax and sigmoid
/// probabilities, the balancing loss, the loss-free bias (non-zero, changing the choice),
/// the warm-up, the gated intermediate steps, the random router.
#[test]
fn token_choice_device_path_equals_the_host_path() {
    let h = hidden(3, 10, D, 3);
    for (params, mode, bias) in [
        ("", RouteMode::Train, None),
        (
            "router_func = \"sigmoid\"\nalpha = 0.1\ngate_intermediate = true",
            RouteMode::Causal,
            None,
        ),
        (
            "balancing = \"loss_free\"",
            RouteMode::Train,
            Some([0.3, -0.2, 0.05]),
        ),
        ("bal_warmup_steps = 5", RouteMode::Train, None),
        ("rand_router = true", RouteMode::FullSequence, None),
        (
            "router_arch = \"mlp\"\nz_loss = false",
            RouteMode::Train,
            None,
        ),
    ] {
        same_on_both_paths(params, mode, &h, bias);
    }
    // The cases route tokens to every depth, with rows of unequal counts (padding).
    let r = router("", "host", 10, None);
    let (_, steps, _) = forward(r.as_ref(), &h, NR, RouteMode::Train).unwrap();
    let lens: Vec<usize> = steps[1].selected.iter().map(Vec::len).collect();
    assert!(lens.iter().any(|&n| n != lens[0]), "{lens:?}");
    assert!(steps[2].num_selected() > 0 && steps[1].num_selected() < 30);
    // A device-path forward routed on the host (`route`) reads its depths once and routes
    // as the host path does.
    let dev = router("", "device", 10, None);
    let scope = mor_kernels::host_sync::Scope::start();
    let (_, ds, dout) = forward(dev.as_ref(), &h, NR, RouteMode::Train).unwrap();
    // One read for the depths and gates together at the first `route`, one in `finish`
    // for the logged values.
    assert_eq!(scope.counts().reads, 2);
    let (_, hs, ho) = forward(r.as_ref(), &h, NR, RouteMode::Train).unwrap();
    for (a, b) in hs.iter().zip(&ds) {
        assert_eq!(a.selected, b.selected);
    }
    assert_eq!(ho.terms, dout.terms);
    assert_eq!(ho.stats.tokens_per_depth, dout.stats.tokens_per_depth);
    let _ = DType::F64;
}
