//! `cargo xtask ablate [--grid FILE | --preset quick|small] [--data PATH] [--out DIR]`:
//! trains every run of an ablation grid, evaluates each, and writes `results.md`,
//! `results.csv`, `results.json`, SVG plots and `depth_tokens.html` into `--out`.
//!
//! A grid file is a base config plus runs and/or axes:
//!
//! ```toml
//! [base]                 # a full run config (same keys as a config file)
//! model = { preset = "tiny" }
//! # ...
//! [[runs]]               # named variants of the base: dotted keys -> values
//! name = "vanilla"
//! set = { "recursion.num_recursions" = 1, "recursion.sharing" = "none", "router" = "none" }
//! [axes]                 # optional: every run is crossed with every combination
//! "router.kind" = ["expert_choice", "token_choice"]
//! ```
//!
//! `"router" = "none"` removes the router (vanilla and recursive baselines). On a rerun, a
//! run whose folder holds a finished run with the same resolved config and data (content
//! fingerprint) is reused and an unfinished one resumed; a folder whose config or data
//! differ is refused before anything trains, naming the differing keys, unless `--force`
//! moves it aside (to `NAME.old-<unix time>`, kept) and trains the run again. `--backend
//! KIND` runs every run on that backend; a run folder that differs only in its backend is
//! then reused (finished) or continued on it (unfinished) instead of being refused.

use anyhow::{bail, Context};
use mor_core::config::{apply_override, Config};
use mor_models::progress::AblationProgress;
use mor_models::report::{self, RunSummary};
use mor_models::run::{
    check_backend, inspect, read_curve, run_with, with_backend, BackendSwitch, EvalResults,
    RunOptions,
};
use std::path::PathBuf;

/// Flags of `ablate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A grid file (TOML: `[base]`, `[[runs]]`, `[axes]`).
    #[arg(long, conflicts_with = "preset")]
    grid: Option<PathBuf>,
    /// A built-in grid: `quick` (about 3 minutes on 2 cores) or `small` (about 30 minutes).
    #[arg(long)]
    preset: Option<String>,
    /// Training data for every run (overrides `data.source`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder (default: `runs/ablate-<grid name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only list the runs the grid expands into.
    #[arg(long)]
    dry_run: bool,
    /// No progress bars: a plain progress line every few steps instead (for log files).
    #[arg(long)]
    quiet: bool,
    /// Train again the runs whose folder holds a run of another config or other data: each
    /// such folder is first renamed to `NAME.old-<unix time>` (nothing is deleted).
    #[arg(long)]
    force: bool,
    /// Run every run of the grid on this backend (`runtime.backend = "KIND"`). An existing
    /// run folder whose config differs only in its backend is then reused when finished and
    /// continued on this backend when not (not bit-identical to an uninterrupted run;
    /// recorded in its segments.jsonl); without the flag it is refused.
    #[arg(long, value_name = "KIND")]
    backend: Option<String>,
}

const QUICK: &str = include_str!("../../configs/grids/quick.toml");
const SMALL: &str = include_str!("../../configs/grids/small.toml");

/// One expanded run: its name and its config table.
#[derive(Debug, Clone)]
pub struct GridRun {
    /// Unique run name (folder name).
    pub name: String,
    /// The config table after overrides.
    pub table: toml::Table,
}

fn apply(table: &mut toml::Table, key: &str, value: &toml::Value) -> anyhow::Result<()> {
    if value.as_str() == Some("none") && !key.contains('.') {
        table.remove(key);
        return Ok(());
    }
    apply_override(table, key, value.clone())?;
    Ok(())
}

fn value_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string().replace(['"', ' '], ""),
    }
}

/// Expands a grid file into runs.
pub fn expand(text: &str, origin: &str) -> anyhow::Result<Vec<GridRun>> {
    let grid: toml::Table = text
        .parse()
        .with_context(|| format!("{origin}: not valid TOML"))?;
    for k in grid.keys() {
        if !["name", "base", "runs", "axes"].contains(&k.as_str()) {
            bail!(
                "{origin}: unknown key `{k}`; a grid has `name`, `[base]`, `[[runs]]` and `[axes]`"
            );
        }
    }
    let base = match grid.get("base") {
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => bail!("{origin}: `base` must be a table"),
        None => bail!("{origin}: missing `[base]` (the config every run starts from)"),
    };
    let mut runs: Vec<GridRun> = Vec::new();
    match grid.get("runs") {
        None => runs.push(GridRun {
            name: "base".into(),
            table: base.clone(),
        }),
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let t = item
                    .as_table()
                    .with_context(|| format!("{origin}: runs[{i}] must be a table"))?;
                let name = t
                    .get("name")
                    .and_then(|v| v.as_str())
                    .with_context(|| format!("{origin}: runs[{i}] needs a `name`"))?
                    .to_string();
                for k in t.keys() {
                    if k != "name" && k != "set" {
                        bail!(
                            "{origin}: runs[{i}] (`{name}`): unknown key `{k}`; allowed: name, set"
                        );
                    }
                }
                let mut table = base.clone();
                if let Some(set) = t.get("set") {
                    let set = set
                        .as_table()
                        .with_context(|| format!("{origin}: runs[{i}].set must be a table"))?;
                    for (k, v) in set {
                        apply(&mut table, k, v)
                            .with_context(|| format!("{origin}: run `{name}`"))?;
                    }
                }
                runs.push(GridRun { name, table });
            }
        }
        Some(_) => bail!("{origin}: `runs` must be an array of tables ([[runs]])"),
    }
    if let Some(axes) = grid.get("axes") {
        let axes = axes
            .as_table()
            .with_context(|| format!("{origin}: `axes` must be a table"))?;
        for (key, values) in axes {
            let values = values
                .as_array()
                .with_context(|| format!("{origin}: axes.\"{key}\" must be an array of values"))?;
            if values.is_empty() {
                bail!(
                    "{origin}: axis `{key}` has no values; give at least one (or remove the axis)"
                );
            }
            let mut next = Vec::new();
            for r in &runs {
                for v in values {
                    let mut table = r.table.clone();
                    apply(&mut table, key, v).with_context(|| format!("{origin}: axis `{key}`"))?;
                    let leaf = key.rsplit('.').next().unwrap_or(key);
                    next.push(GridRun {
                        name: format!("{}__{leaf}={}", r.name, value_label(v)),
                        table,
                    });
                }
            }
            runs = next;
        }
    }
    if runs.is_empty() {
        bail!("{origin}: `runs` is empty; give at least one [[runs]] (or none, to run `[base]`)");
    }
    let mut seen = std::collections::HashSet::new();
    for r in &runs {
        if !seen.insert(r.name.clone()) {
            bail!("{origin}: two runs are named `{}`", r.name);
        }
        if r.name.contains(['/', '\\']) || r.name.starts_with('.') {
            bail!("{origin}: run name `{}` cannot be a folder name", r.name);
        }
    }
    Ok(runs)
}

/// Runs `ablate`.
pub fn run_cmd(args: &Args) -> anyhow::Result<()> {
    let (text, origin, gname) = match (&args.grid, args.preset.as_deref()) {
        (Some(p), _) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read grid {}", p.display()))?,
            p.display().to_string(),
            p.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("grid")
                .to_string(),
        ),
        (None, None) | (None, Some("quick")) => {
            (QUICK.to_string(), "preset quick".into(), "quick".into())
        }
        (None, Some("small")) => (SMALL.to_string(), "preset small".into(), "small".into()),
        (None, Some(other)) => {
            bail!("unknown preset `{other}`; allowed: quick, small (or --grid FILE)")
        }
    };
    if let Some(d) = &args.data {
        if !d.exists() {
            bail!("--data {}: no such file or folder", d.display());
        }
    }
    let runs = expand(&text, &origin)?;
    // An unknown backend is one problem, not one per run.
    if let Some(kind) = &args.backend {
        check_backend(kind)?;
    }
    // Resolve every run before training any, so a typo fails fast.
    let mut configs = Vec::new();
    let mut problems = Vec::new();
    for r in &runs {
        let resolved = Config::from_table(r.table.clone())
            .map_err(anyhow::Error::from)
            .and_then(|c| match &args.backend {
                Some(kind) => Ok(with_backend(&c, kind)?),
                None => Ok(c),
            });
        match resolved {
            Ok(c) => configs.push(c),
            Err(e) => problems.push(format!("run `{}`: {e}", r.name)),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{origin}: {} run(s) have config problems:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("ablate-{gname}")));
    if args.dry_run {
        for (r, c) in runs.iter().zip(&configs) {
            println!(
                "{:<40} router={:<14} kv={:<18} sharing={:<14} N_r={} steps={}",
                r.name,
                c.router.as_ref().map(|x| x.kind.as_str()).unwrap_or("-"),
                c.kv.kind,
                c.recursion.sharing.kind,
                c.plan.num_recursions,
                c.train.steps
            );
        }
        return Ok(());
    }
    // Every `[init]` source must exist and fit its run before anything trains.
    let mut misfits = Vec::new();
    for (r, c) in runs.iter().zip(&configs) {
        if let Some(init) = &c.init {
            if let Err(e) = mor_models::hf::pretrained_layers(&init.from)
                .and_then(|n| mor_models::hf::init_mapping(c, init, n))
            {
                misfits.push(format!("run `{}`: {e}", r.name));
            }
        }
    }
    if !misfits.is_empty() {
        bail!(
            "{} run(s) cannot be initialised from their `[init]` source; nothing was trained:\n{}",
            misfits.len(),
            misfits.join("\n")
        );
    }
    let switch = if args.backend.is_some() {
        BackendSwitch::Allow
    } else {
        BackendSwitch::Refuse
    };
    let opts_for = |dir: PathBuf, label: String| RunOptions {
        out: dir,
        data: args.data.clone(),
        resume: true,
        quiet: args.quiet,
        label,
        stop_after: None,
        skip_eval: false,
    };
    // Before training anything: every existing run folder must hold the same resolved
    // config and data as the grid now gives, or be moved aside with --force.
    let mut stale = Vec::new();
    for (r, cfg) in runs.iter().zip(&configs) {
        let dir = out.join(&r.name);
        if !dir.join("config.toml").exists() {
            continue;
        }
        let insp = inspect(cfg, &opts_for(dir.clone(), String::new()))
            .with_context(|| format!("run `{}` in {}", r.name, dir.display()))?;
        if !insp.is_compatible_with(switch) {
            stale.push((r.name.clone(), dir, insp.problems()));
        }
    }
    if !stale.is_empty() && !args.force {
        let list: Vec<String> = stale
            .iter()
            .map(|(n, _, p)| format!("run `{n}`:\n    {}", p.replace('\n', "\n    ")))
            .collect();
        bail!(
            "{} existing run(s) in {} were trained with another config or other data, so their results would be stale:\n{}\n\
             rerun with --force to move them aside (to NAME.old-<unix time>) and train them again, or choose another --out",
            stale.len(),
            out.display(),
            list.join("\n")
        );
    }
    for (name, dir, _) in &stale {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut aside = out.join(format!("{name}.old-{stamp}"));
        let mut k = 1;
        while aside.exists() {
            aside = out.join(format!("{name}.old-{stamp}-{k}"));
            k += 1;
        }
        // Under the run's lock: a process still training into the folder refuses the move
        // (naming its PID) instead of losing its files.
        mor_models::runlock::RunLock::acquire(dir)
            .and_then(|lock| lock.rename_folder(&aside))
            .with_context(|| format!("cannot move {} aside", dir.display()))?;
        eprintln!(
            "{name}: config or data changed; the old run was moved to {}",
            aside.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = std::time::Instant::now();
    let progress = AblationProgress::new(runs.len(), args.quiet);
    let mut summaries: Vec<RunSummary> = Vec::new();
    let mut curves = Vec::new();
    let mut traces = Vec::new();
    for (r, cfg) in runs.iter().zip(&configs) {
        let dir = out.join(&r.name);
        let bar = progress.start_run(&r.name, cfg.train.steps);
        let label = bar.label().to_string();
        drop(bar);
        let opts = opts_for(dir.clone(), label);
        match run_with(cfg, &r.name, &opts, switch) {
            Ok(o) => {
                progress.finish_run(&r.name, true);
                if o.already_finished {
                    eprintln!(
                        "{}: already finished with the same config and data, reused",
                        r.name
                    );
                }
                traces.extend(o.traces.iter().cloned());
                curves.push(o.curve);
                summaries.push(o.summary);
            }
            Err(e) => {
                progress.finish_run(&r.name, false);
                eprintln!("{}: failed: {e}", r.name);
                summaries.push(failed_summary(&r.name, cfg, &e.to_string()));
                if let Ok(c) = read_curve(&r.name, &dir.join("metrics.jsonl")) {
                    curves.push(c);
                }
            }
        }
    }
    let data = report_data(&out, &summaries, &curves, &traces);
    let files = report::write_report_data(&out, &data)
        .with_context(|| format!("cannot write the report into {}", out.display()))?;
    eprintln!("{}", progress.finish());
    println!("{}", report::results_markdown(&data));
    println!(
        "wrote {} ({:.0}s)",
        files.results_md.display(),
        started.elapsed().as_secs_f64()
    );
    let failed = summaries.iter().filter(|s| !s.is_done()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} run(s) failed; see results.md",
            summaries.len()
        );
    }
    Ok(())
}

fn report_data(
    out: &std::path::Path,
    summaries: &[RunSummary],
    curves: &[report::Curve],
    traces: &[report::DepthTrace],
) -> report::ReportData {
    // Depth per difficulty label over the whole validation split (eval.json) where the run
    // was evaluated on labelled data; the sample traces otherwise. Only routed runs: the
    // depth of every token of a vanilla or recursive model is fixed.
    let from_traces = report::depth_by_difficulty(traces);
    let mut depth_by_difficulty: Vec<report::DepthByDifficulty> = summaries
        .iter()
        .filter(|s| s.model == "mor")
        .filter_map(|s| {
            let eval: Option<EvalResults> =
                std::fs::read_to_string(out.join(&s.name).join("eval.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            let from_eval = eval
                .and_then(|e| e.full_sequence)
                .map(|n| report::DepthByDifficulty::from_means(&s.name, &n.depth_by_difficulty))
                .filter(|d| !d.by_label.is_empty());
            from_eval.or_else(|| {
                from_traces
                    .iter()
                    .find(|d| d.run == s.name && !d.by_label.is_empty())
                    .cloned()
            })
        })
        .collect();
    // Difficulty as each token's NLL under the ablation's vanilla run on the same validation
    // tokens (token_scores.bin), in quintiles, for every finished routed run: this works on
    // any text; the labels of the built-in corpus are kept beside it.
    let reference = summaries
        .iter()
        .find(|s| s.model == "vanilla" && s.is_done())
        .and_then(|v| {
            Some((
                v,
                mor_models::eval::load_token_scores(&out.join(&v.name)).ok()?,
            ))
        });
    if let Some((v, ref_scores)) = &reference {
        for s in summaries.iter().filter(|s| s.model == "mor" && s.is_done()) {
            let Ok(scores) = mor_models::eval::load_token_scores(&out.join(&s.name)) else {
                continue;
            };
            match report::depth_by_reference_nll(&v.name, ref_scores, &s.name, &scores) {
                Ok(d) => depth_by_difficulty.push(d),
                Err(e) => eprintln!("{}: no depth against the NLL of {}: {e}", s.name, v.name),
            }
        }
    }
    report::ReportData {
        runs: summaries.to_vec(),
        curves: curves.to_vec(),
        traces: traces.to_vec(),
        depth_by_difficulty,
    }
}

fn failed_summary(name: &str, cfg: &mor_core::config::ResolvedConfig, msg: &str) -> RunSummary {
    RunSummary {
        name: name.to_string(),
        model: if cfg.router.is_some() {
            "mor".into()
        } else if cfg.plan.num_recursions > 1 {
            "recursive".into()
        } else {
            "vanilla".into()
        },
        router: cfg
            .router
            .as_ref()
            .map(|r| r.kind.clone())
            .unwrap_or_else(|| "-".into()),
        kv_policy: cfg.kv.kind.clone(),
        sharing: cfg.recursion.sharing.kind.clone(),
        num_recursions: cfg.plan.num_recursions,
        params_non_embedding: 0,
        params_embedding: 0,
        flops_per_token: 0.0,
        train_flops: 0.0,
        train_tokens: 0,
        steps: 0,
        val_nll: f64::NAN,
        val_nll_causal: None,
        bits_per_byte: f64::NAN,
        bits_per_byte_causal: None,
        accuracy: None,
        acc_norm: None,
        dead_token_ratio: None,
        sampling_acc: None,
        maxvio: None,
        entropy: None,
        tokens_per_depth: Vec::new(),
        train_tokens_per_sec: 0.0,
        wall_secs: 0.0,
        status: format!("failed: {}", msg.lines().next().unwrap_or(msg)),
        extra: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_against_the_vanilla_nll_comes_from_token_scores() {
        use mor_models::report::{RuleScores, TokenScores};
        let dir = std::env::temp_dir().join(format!("mor-ablate-refnll-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = mor_models::builtin::link();
        let runs = expand(QUICK, "quick").unwrap();
        let cfg = |name: &str| {
            Config::from_table(runs.iter().find(|r| r.name == name).unwrap().table.clone()).unwrap()
        };
        let done = |name: &str| RunSummary {
            status: "done".into(),
            ..failed_summary(name, &cfg(name), "x")
        };
        let nll: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let hash = mor_models::report::targets_hash(&[1, 2, 3]);
        let scores = |depth: Option<Vec<u8>>| TokenScores {
            row_len: 5,
            targets_hash: hash,
            full_sequence: Some(RuleScores {
                nll: nll.clone(),
                depth,
            }),
            causal: None,
        };
        for (name, s) in [
            ("vanilla", scores(None)),
            (
                "mor_expert_mcyc_nr3",
                scores(Some(vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 3])),
            ),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            mor_models::eval::save_token_scores(&dir.join(name), &s).unwrap();
        }
        let data = report_data(
            &dir,
            &[done("vanilla"), done("mor_expert_mcyc_nr3")],
            &[],
            &[],
        );
        assert_eq!(data.depth_by_difficulty.len(), 1);
        let d = &data.depth_by_difficulty[0];
        // Quintiles by the vanilla NLL are tokens (0,1) (2,3) (4,5) (6,7) (8,9).
        let means: Vec<f64> = d.by_label.iter().map(|s| s.mean_depth).collect();
        assert_eq!(means, [1.0, 1.5, 2.0, 3.0, 3.0]);
        assert!(matches!(&d.measure,
            report::DifficultyMeasure::ReferenceNll { reference, .. } if reference == "vanilla"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn depth_by_difficulty_prefers_the_validation_split() {
        let dir = std::env::temp_dir().join(format!("mor-ablate-depth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = mor_models::builtin::link();
        let runs = expand(QUICK, "quick").unwrap();
        let cfg = |name: &str| {
            let r = runs.iter().find(|r| r.name == name).unwrap();
            Config::from_table(r.table.clone()).unwrap()
        };
        // Two routed runs (one evaluated, one with only a trace) and the vanilla one.
        let evaluated = failed_summary("mor_expert_mcyc_nr3", &cfg("mor_expert_mcyc_nr3"), "x");
        let traced = failed_summary("mor_token_mcyc_nr3", &cfg("mor_token_mcyc_nr3"), "x");
        let vanilla = failed_summary("vanilla", &cfg("vanilla"), "x");
        std::fs::create_dir_all(dir.join("mor_expert_mcyc_nr3")).unwrap();
        let eval = EvalResults {
            full_sequence: Some(mor_models::eval::NllReport {
                depth_by_difficulty: vec![(1.5, 100), (2.25, 40), (0.0, 0), (2.75, 8)],
                ..Default::default()
            }),
            ..Default::default()
        };
        std::fs::write(
            dir.join("mor_expert_mcyc_nr3/eval.json"),
            serde_json::to_string(&eval).unwrap(),
        )
        .unwrap();
        let tok = |depth, difficulty| report::TraceToken {
            text: "a".into(),
            depth,
            difficulty: Some(difficulty),
        };
        let traces = vec![
            report::DepthTrace {
                run: "mor_expert_mcyc_nr3".into(),
                tokens: vec![tok(3, 0)],
                rule: Default::default(),
                sequence: None,
            },
            report::DepthTrace {
                run: "mor_token_mcyc_nr3".into(),
                tokens: vec![tok(1, 0), tok(3, 1), tok(2, 1)],
                rule: Default::default(),
                sequence: None,
            },
            report::DepthTrace {
                run: "vanilla".into(),
                tokens: vec![tok(1, 0)],
                rule: Default::default(),
                sequence: None,
            },
        ];
        let data = report_data(&dir, &[evaluated, traced, vanilla], &[], &traces);
        let d = &data.depth_by_difficulty;
        assert_eq!(d.len(), 2, "vanilla has no routing: {d:?}");
        // From eval.json: labels 0, 1 and 3 (label 2 had no tokens).
        assert_eq!(d[0].run, "mor_expert_mcyc_nr3");
        let got: Vec<(u8, u64, f64)> = d[0]
            .by_label
            .iter()
            .map(|s| (s.difficulty, s.count, s.mean_depth))
            .collect();
        assert_eq!(got, [(0, 100, 1.5), (1, 40, 2.25), (3, 8, 2.75)]);
        // From the trace: label 0 → 1.0 (1 token), label 1 → 2.5 (2 tokens).
        assert_eq!(d[1].run, "mor_token_mcyc_nr3");
        assert_eq!(d[1].mean_depth(1), Some(2.5));
        assert_eq!(d[1].by_label[1].count, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn presets_expand_and_resolve() {
        let _ = mor_models::builtin::link();
        for (text, origin) in [(QUICK, "quick"), (SMALL, "small")] {
            let runs = expand(text, origin).unwrap();
            assert!(runs.len() >= 6, "{origin}: {} runs", runs.len());
            for r in &runs {
                Config::from_table(r.table.clone())
                    .unwrap_or_else(|e| panic!("{origin}/{}: {e}", r.name));
            }
        }
    }

    #[test]
    fn quick_covers_the_required_axes() {
        let _ = mor_models::builtin::link();
        let cfgs: Vec<_> = expand(QUICK, "quick")
            .unwrap()
            .into_iter()
            .map(|r| Config::from_table(r.table).unwrap())
            .collect();
        let has = |f: &dyn Fn(&mor_core::config::ResolvedConfig) -> bool| cfgs.iter().any(f);
        assert!(
            has(&|c| c.router.is_none() && c.plan.num_recursions == 1),
            "vanilla"
        );
        assert!(
            has(&|c| c.router.is_none()
                && c.plan.num_recursions == 2
                && c.recursion.sharing.kind == "middle_cycle"),
            "recursive middle_cycle N_r=2"
        );
        for kind in ["expert_choice", "token_choice"] {
            assert!(
                has(&|c| c.router.as_ref().is_some_and(|r| r.kind == kind)),
                "{kind}"
            );
        }
        for kv in ["recursion_wise", "recursive_sharing"] {
            assert!(has(&|c| c.router.is_some() && c.kv.kind == kv), "{kv}");
        }
        for s in ["cycle", "middle_cycle"] {
            assert!(
                has(&|c| c.router.is_some() && c.recursion.sharing.kind == s),
                "{s}"
            );
        }
    }

    #[test]
    fn grid_errors_name_the_problem() {
        let e = expand("[base]\n[[runs]]\nset = {}\n", "g")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a `name`"), "{e}");
        let e = expand("bogus = 1\n[base]\n", "g").unwrap_err().to_string();
        assert!(e.contains("unknown key `bogus`"), "{e}");
        let e = expand(
            "[base]\n[[runs]]\nname = \"a\"\n[[runs]]\nname = \"a\"\n",
            "g",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("two runs are named `a`"), "{e}");
    }

    #[test]
    fn an_empty_axis_or_run_list_is_an_error() {
        let e = expand(
            "[base]\n[axes]\n\"train.lr\" = [1e-3]\n\"router.kind\" = []\n",
            "g",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("axis `router.kind` has no values"), "{e}");
        let e = expand("runs = []\n[base]\n", "g").unwrap_err().to_string();
        assert!(e.contains("`runs` is empty"), "{e}");
    }

    #[test]
    fn axes_cross_runs() {
        let g = "[base]\nrouter = { kind = \"expert_choice\" }\n[[runs]]\nname = \"a\"\n[[runs]]\nname = \"b\"\nset = { \"router\" = \"none\" }\n[axes]\n\"train.lr\" = [1e-3, 2e-3]\n";
        let runs = expand(g, "g").unwrap();
        let names: Vec<_> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["a__lr=0.001", "a__lr=0.002", "b__lr=0.001", "b__lr=0.002"]
        );
        assert!(runs[2].table.get("router").is_none());
        assert_eq!(runs[1].table["train"]["lr"].as_float(), Some(2e-3));
    }
}
