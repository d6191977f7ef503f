//! Comparisons over several seeds (`--compare ... --seeds 42,43,44`): every optimizer trained
//! once per seed, then `compare.md` (final validation loss as mean ± spread over the seeds, the
//! per-seed values, loss spikes, state bytes, step time), `compare.png` (mean curves with the
//! seeds' min–max as a shaded band) and `runs.json` (every run's history, to remake the plots).

use super::train::{History, Outcome};
use super::{human_bytes, Result};
use candle_optim::Algo;
use serde_json::json;
use std::path::Path;

/// The runs of one optimizer, one per seed (in the order the seeds were given).
pub struct SeedRuns {
    pub algo: Algo,
    pub runs: Vec<(u64, Outcome)>,
}

/// Values over seeds (the finite ones).
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// How many values were finite.
    pub n: usize,
    pub mean: f64,
    /// Half of max − min.
    pub spread: f64,
    /// Sample standard deviation (n − 1 in the denominator; 0 for a single value).
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// [`Stats`] of the finite values of `xs`, if there are any.
pub fn stats(xs: &[f64]) -> Option<Stats> {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n as f64;
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let std = if n > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    Some(Stats {
        n,
        mean,
        spread: (max - min) / 2.0,
        std,
        min,
        max,
    })
}

/// The largest training loss after step 10 divided by the loss of the first step: above 1, the
/// run spiked above where it started. `None` when the run has no step after 10; infinite when the
/// loss became NaN or infinite.
pub fn spike_ratio(h: &History) -> Option<f64> {
    let first = h.train.first()?.1;
    h.train
        .iter()
        .filter(|p| p.0 > 10)
        .map(|p| {
            if p.1.is_finite() {
                p.1 / first
            } else {
                f64::INFINITY
            }
        })
        .reduce(f64::max)
}

fn val_loss(o: &Outcome) -> f64 {
    if o.diverged_at.is_some() {
        f64::NAN
    } else {
        o.final_eval.loss
    }
}

fn val_acc(o: &Outcome) -> f64 {
    match (o.diverged_at, o.final_eval.acc) {
        (None, Some(a)) => a,
        _ => f64::NAN,
    }
}

fn pm(s: Option<Stats>, total: usize, scale: f64, digits: usize, unit: &str) -> String {
    match s {
        None => "-".into(),
        Some(s) => {
            let mut t = format!(
                "{:.digits$}{unit} ± {:.digits$}{unit}",
                s.mean * scale,
                s.spread * scale
            );
            if s.n < total {
                t.push_str(&format!(" ({} of {total} seeds)", s.n));
            }
            t
        }
    }
}

fn ratio_text(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.is_finite() => format!("{r:.3}"),
        Some(_) => "inf".into(),
    }
}

/// The Markdown table: one row per optimizer.
pub fn table(groups: &[SeedRuns], classification: bool) -> String {
    let mut t = String::from(
        "| optimizer | lr | val loss (mean ± spread) | val loss std | val loss per seed |",
    );
    if classification {
        t.push_str(" val acc (mean ± spread) |");
    }
    t.push_str(
        " train loss (mean) | max loss / initial loss: worst (per seed) | state bytes | ms/step |\n\
         |---|---:|---:|---:|---|",
    );
    if classification {
        t.push_str("---:|");
    }
    t.push_str("---:|---|---:|---:|\n");
    for g in groups {
        let n = g.runs.len();
        let losses: Vec<f64> = g.runs.iter().map(|r| val_loss(&r.1)).collect();
        let ls = stats(&losses);
        let per_seed: Vec<String> = g
            .runs
            .iter()
            .map(|(seed, o)| match o.diverged_at {
                Some(at) => format!("{seed}: diverged at step {at}"),
                None => format!("{seed}: {:.4}", o.final_eval.loss),
            })
            .collect();
        let lr = g.runs.first().map_or(f64::NAN, |r| r.1.lr);
        let std = ls.map_or("-".into(), |s| format!("{:.4}", s.std));
        let mut row = format!(
            "| {} | {lr:e} | {} | {std} | {} |",
            g.algo.name(),
            pm(ls, n, 1.0, 4, ""),
            per_seed.join(", ")
        );
        if classification {
            let accs: Vec<f64> = g.runs.iter().map(|r| val_acc(&r.1)).collect();
            row.push_str(&format!(" {} |", pm(stats(&accs), n, 100.0, 2, "%")));
        }
        let trains: Vec<f64> = g.runs.iter().map(|r| r.1.final_train).collect();
        let spikes: Vec<Option<f64>> = g.runs.iter().map(|r| spike_ratio(&r.1.history)).collect();
        let worst = spikes.iter().flatten().copied().reduce(f64::max);
        let state = g.runs.first().map_or(0, |r| r.1.state_bytes);
        let ms = stats(&g.runs.iter().map(|r| r.1.ms_step).collect::<Vec<_>>());
        row.push_str(&format!(
            " {} | {} ({}) | {} ({state} B) | {} |\n",
            stats(&trains).map_or("-".into(), |s| format!("{:.4}", s.mean)),
            ratio_text(worst),
            spikes
                .iter()
                .map(|r| ratio_text(*r))
                .collect::<Vec<_>>()
                .join(", "),
            human_bytes(state),
            ms.map_or("-".into(), |s| format!("{:.1}", s.mean)),
        ));
        t.push_str(&row);
    }
    t
}

/// The line comparing SGD-SaI with AdamW over the seeds both ran, when both ran.
pub fn sgd_sai_vs_adamw(groups: &[SeedRuns], classification: bool) -> Option<String> {
    let s = groups.iter().find(|g| g.algo == Algo::SgdSai)?;
    let a = groups.iter().find(|g| g.algo == Algo::AdamW)?;
    let sl: Vec<f64> = s.runs.iter().map(|r| val_loss(&r.1)).collect();
    let al: Vec<f64> = a.runs.iter().map(|r| val_loss(&r.1)).collect();
    let fmt = |st: Option<Stats>| {
        st.map_or("-".into(), |st| {
            format!("{:.4} ± {:.4} (std {:.4})", st.mean, st.spread, st.std)
        })
    };
    let mut per_seed = Vec::new();
    let mut ratios = Vec::new();
    let mut missing = Vec::new();
    for (seed, so) in &s.runs {
        let Some((_, ao)) = a.runs.iter().find(|r| r.0 == *seed) else {
            continue;
        };
        let (x, y) = (val_loss(so), val_loss(ao));
        if x.is_finite() && y.is_finite() {
            ratios.push(x / y);
            per_seed.push(format!("{seed}: {x:.4} / {y:.4} = {:.4}", x / y));
        } else {
            missing.push(format!("{seed}: {x:.4} / {y:.4}"));
            per_seed.push(format!("{seed}: {x:.4} / {y:.4} (diverged)"));
        }
    }
    let r = if ratios.is_empty() {
        f64::NAN
    } else {
        ratios.iter().sum::<f64>() / ratios.len() as f64
    };
    let within = if !missing.is_empty() || !r.is_finite() {
        "no (a run diverged)".to_string()
    } else if r <= 1.02 {
        if r < 0.98 {
            "yes (SGD-SaI lower by more than 2%)".to_string()
        } else {
            "yes".to_string()
        }
    } else {
        "no".to_string()
    };
    let mut msg = format!(
        "SGD-SaI vs AdamW: val loss mean {} vs {}, ratio (mean of per-seed ratios) {r:.4}, \
         per seed: {}; within 2% (mean ratio ≤ 1.02): {within}",
        fmt(stats(&sl)),
        fmt(stats(&al)),
        per_seed.join(", ")
    );
    if classification {
        let sa: Vec<f64> = s.runs.iter().map(|r| val_acc(&r.1)).collect();
        let aa: Vec<f64> = a.runs.iter().map(|r| val_acc(&r.1)).collect();
        msg.push_str(&format!(
            "; val acc {} vs {}",
            pm(stats(&sa), sa.len(), 100.0, 2, "%"),
            pm(stats(&aa), aa.len(), 100.0, 2, "%")
        ));
    }
    let (sb, ab) = (
        s.runs.first().map_or(0, |r| r.1.state_bytes),
        a.runs.first().map_or(0, |r| r.1.state_bytes),
    );
    msg.push_str(&format!(
        "; optimizer state {} vs {} ({:.3}× of AdamW's).",
        human_bytes(sb),
        human_bytes(ab),
        sb as f64 / ab.max(1) as f64
    ));
    Some(msg)
}

/// Prints the comparison and writes `compare.md`, `compare.png` and `runs.json` into `out`
/// (see [`write`]).
pub fn report(
    out: &Path,
    title: &str,
    plot_title: &str,
    groups: &[SeedRuns],
    classification: bool,
    config: &serde_json::Value,
) -> Result<()> {
    println!("\n{title}\n\n{}", table(groups, classification));
    if let Some(v) = sgd_sai_vs_adamw(groups, classification) {
        println!("{v}");
    }
    write(out, title, plot_title, groups, classification, config)?;
    println!(
        "\nWrote compare.md, compare.png and runs.json to {}",
        out.display()
    );
    Ok(())
}

/// Writes `compare.md`, `compare.png` and `runs.json` into `out`. `title` heads compare.md
/// (every setting of the runs); `plot_title` (shorter) heads the plot; `config` (the settings
/// as JSON) goes into runs.json.
pub fn write(
    out: &Path,
    title: &str,
    plot_title: &str,
    groups: &[SeedRuns],
    classification: bool,
    config: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let tab = table(groups, classification);
    let vs = sgd_sai_vs_adamw(groups, classification);
    let md = out.join("compare.md");
    let mut text = format!("# {title}\n\n{tab}\n");
    if let Some(v) = &vs {
        text.push_str(&format!("{v}\n\n"));
    }
    text.push_str(
        "val loss: the final evaluation of each seed's run; mean ± spread over the seeds, spread \
         = half of max − min; std: the sample standard deviation (n − 1). A diverged run counts \
         in no mean. train loss: per run the mean over its last 5% of steps, then the mean over \
         the seeds. max loss / initial loss: the largest training loss after step 10 over the \
         loss of step 1 (above 1: a spike above the starting loss; - for runs of 10 steps or \
         fewer). state bytes: optimizer state after training. ms/step: per run the median wall \
         time of forward, backward and optimizer step, then the mean over the seeds. SGD-SaI vs \
         AdamW: ratio = SGD-SaI's val loss over AdamW's from the same seed (same initial weights \
         and batches), averaged over the seeds. compare.png: means over the seeds, the band \
         spanning their min and max; runs.json: every run's history.\n",
    );
    std::fs::write(&md, text).map_err(|e| format!("{}: {e}", md.display()))?;
    let png = out.join("compare.png");
    let runs: Vec<(&str, Vec<&History>)> = groups
        .iter()
        .map(|g| (g.algo.name(), g.runs.iter().map(|r| &r.1.history).collect()))
        .collect();
    super::plot::seed_curves(&png, plot_title, &runs, classification)?;
    let json_path = out.join("runs.json");
    let runs_json: Vec<serde_json::Value> = groups
        .iter()
        .flat_map(|g| {
            g.runs.iter().map(move |(seed, o)| {
                json!({
                    "optimizer": g.algo.name(),
                    "seed": seed,
                    "lr": o.lr,
                    "final_train": o.final_train,
                    "val_loss": o.final_eval.loss,
                    "val_acc": o.final_eval.acc,
                    "diverged_at": o.diverged_at,
                    "max_loss_over_initial": spike_ratio(&o.history),
                    "ms_step": o.ms_step,
                    "state_bytes": o.state_bytes,
                    "params": o.params,
                    "history": o.history,
                })
            })
        })
        .collect();
    let doc = json!({
        "title": title,
        "config": config,
        "seeds": groups.first().map(|g| g.runs.iter().map(|r| r.0).collect::<Vec<_>>()),
        "runs": runs_json,
    });
    std::fs::write(&json_path, serde_json::to_vec(&doc)?)
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    Ok(())
}

/// Trains every one of `algos` once per seed, seed by seed (every optimizer in turn, so the
/// report written after each seed, and so what an interrupted run leaves, compares the
/// optimizers on the same seeds), then writes the report. `run(algo, seed, save)` trains one.
#[allow(clippy::too_many_arguments)]
pub fn run_all(
    algos: &[Algo],
    seed_list: &[u64],
    save: Option<&Path>,
    out: &Path,
    title: &str,
    plot_title: &str,
    classification: bool,
    config: &serde_json::Value,
    mut run: impl FnMut(Algo, u64, Option<std::path::PathBuf>) -> Result<super::train::Outcome>,
) -> Result<()> {
    let mut groups: Vec<SeedRuns> = algos
        .iter()
        .map(|&algo| SeedRuns {
            algo,
            runs: Vec::new(),
        })
        .collect();
    for (i, &seed) in seed_list.iter().enumerate() {
        for g in groups.iter_mut() {
            let save = save.map(|d| d.join(g.algo.name()).join(format!("seed-{seed}")));
            println!("{} with seed {seed}:", g.algo.name());
            g.runs.push((seed, run(g.algo, seed, save)?));
        }
        if i + 1 < seed_list.len() {
            write(out, title, plot_title, &groups, classification, config)?;
        }
    }
    report(out, title, plot_title, &groups, classification, config)
}
