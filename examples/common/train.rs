//! The examples' training loop: progress bar with loss and throughput, periodic validation,
//! checkpoints of model and optimizer state (`--save DIR` / `--resume DIR`), and the comparison
//! report (a Markdown table and a PNG of the loss curves).

use super::{human_bytes, median, Result};
use candle_core::Tensor;
use candle_nn::VarMap;
use candle_optim::{Algo, Optimizer, Schedule};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A validation result.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Eval {
    pub loss: f64,
    /// Top-1 accuracy in [0, 1] (classification only).
    pub acc: Option<f64>,
}

/// What one example trains: a model, its data and its loss.
pub trait Task {
    /// The loss of the training batch of `step` (0-based; the batch is a function of the seed
    /// and the step alone, so a resumed run sees the same data as an uninterrupted one).
    fn train_loss(&mut self, step: usize) -> candle_core::Result<Tensor>;
    /// Validation loss (and accuracy); `full` for the final evaluation, else a quicker one.
    fn evaluate(&mut self, full: bool) -> candle_core::Result<Eval>;
    /// Items (images, tokens) per training step, for the throughput.
    fn items_per_step(&self) -> usize;
    /// Their name (`img`, `tok`).
    fn unit(&self) -> &'static str;
}

/// Loss curves of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    /// (step, training loss of that step's batch).
    pub train: Vec<(usize, f64)>,
    /// (step, validation loss).
    pub val: Vec<(usize, f64)>,
    /// (step, validation accuracy).
    pub acc: Vec<(usize, f64)>,
    /// Wall time of each training step (forward, backward, optimizer step), in ms.
    pub step_ms: Vec<f64>,
    /// Wall time of each step's `opt.step` alone, in ms (on CUDA: until its launches return).
    #[serde(default)]
    pub opt_ms: Vec<f64>,
}

/// How to train.
pub struct Settings {
    pub steps: usize,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Save a checkpoint to `save` every this many steps (0: only at the end).
    pub save_every: usize,
    pub save: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// The example's name, written into checkpoints.
    pub example: &'static str,
    /// The peak learning rate (for the report).
    pub lr: f64,
    /// The learning-rate schedule over `steps` (set after a checkpoint is loaded, so a run
    /// resumed with a larger --steps stretches it).
    pub schedule: Schedule,
    /// Stop after this step as if interrupted (saving a checkpoint when `save` is set), without
    /// the final evaluation.
    pub stop_after: Option<usize>,
    /// Everything a checkpoint must agree on to be resumed (model, data, batch, seed, ...).
    pub config: serde_json::Value,
}

/// The result of one run.
pub struct Outcome {
    pub algo: Algo,
    pub lr: f64,
    pub history: History,
    /// Mean training loss over the last 5% of steps (at least 1, at most 50).
    pub final_train: f64,
    pub final_eval: Eval,
    /// Median wall time per step.
    pub ms_step: f64,
    /// Median wall time of the optimizer step alone.
    pub ms_opt: f64,
    pub state_bytes: usize,
    pub params: usize,
    /// The step at which the loss became NaN or infinite, if it did.
    pub diverged_at: Option<usize>,
}

/// What `state.json` in a checkpoint directory holds besides the two safetensors files.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    example: String,
    optimizer: String,
    step: usize,
    config: serde_json::Value,
    history: History,
}

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Writes model weights, optimizer state and `state.json` to `dir`.
fn save_checkpoint(
    dir: &Path,
    varmap: &VarMap,
    opt: &dyn Optimizer,
    state: &CheckpointState,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    varmap.save(dir.join(MODEL_FILE))?;
    opt.save(&dir.join(OPTIMIZER_FILE))?;
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    Ok(())
}

/// Restores a checkpoint into `varmap` and `opt` after checking it belongs to this run.
fn load_checkpoint(
    dir: &Path,
    varmap: &mut VarMap,
    opt: &mut dyn Optimizer,
    s: &Settings,
) -> Result<CheckpointState> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if state.example != s.example {
        return Err(format!(
            "{}: a checkpoint of the {} example, not {}",
            dir.display(),
            state.example,
            s.example
        )
        .into());
    }
    if state.optimizer != opt.algorithm() {
        return Err(format!(
            "{}: a checkpoint of {}, but --optimizer is {}",
            dir.display(),
            state.optimizer,
            opt.algorithm()
        )
        .into());
    }
    if state.config != s.config {
        return Err(format!(
            "{}: the checkpoint was made with other settings:\n  checkpoint: {}\n  now:        {}",
            dir.display(),
            state.config,
            s.config
        )
        .into());
    }
    varmap.load(dir.join(MODEL_FILE))?;
    opt.load(&dir.join(OPTIMIZER_FILE))?;
    Ok(state)
}

/// Linear warmup over 5% of the steps (1 to 200), then cosine decay to 10% of the peak.
pub fn default_schedule(steps: usize) -> Schedule {
    let warmup = (steps / 20).clamp(1, 200) as u64;
    Schedule::warmup_cosine(warmup, steps as u64, 0.1)
}

/// The default warmup of [`default_schedule`]: 5% of the steps, 1 to 200.
pub fn default_warmup(steps: usize) -> usize {
    (steps / 20).clamp(1, 200)
}

/// Linear warmup over `warmup` steps ([`default_warmup`] when `None`), then cosine decay to
/// `min_lr_ratio` of the peak at the last step; `schedule(steps, None, 0.1)` is
/// [`default_schedule`].
pub fn schedule(steps: usize, warmup: Option<usize>, min_lr_ratio: f64) -> Schedule {
    let warmup = warmup.unwrap_or_else(|| default_warmup(steps)) as u64;
    Schedule::warmup_cosine(warmup, steps as u64, min_lr_ratio)
}

/// Runs an example's `main` body, printing an error plainly (not `Debug`-quoted).
pub fn exit_on_error(r: Result<()>) {
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Prints `msg` above the progress bar (or plainly when the bar is hidden, e.g. in CI logs).
pub fn say(pb: &ProgressBar, msg: &str) {
    if pb.is_hidden() {
        println!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Trains `task` with `opt` for `s.steps` steps (continuing from `s.resume` if given).
pub fn train(
    task: &mut dyn Task,
    varmap: &mut VarMap,
    opt: &mut dyn Optimizer,
    algo: Algo,
    s: &Settings,
) -> Result<Outcome> {
    let params = super::count_params(varmap);
    let mut history = History::default();
    let mut start = 0;
    if let Some(dir) = &s.resume {
        let state = load_checkpoint(dir, varmap, opt, s)?;
        start = state.step;
        history = state.history;
        println!(
            "Resumed {} from {} at step {start} (optimizer step count {}).",
            algo.name(),
            dir.display(),
            opt.step_count()
        );
        if start >= s.steps {
            println!("The checkpoint is already at --steps {}.", s.steps);
        }
    }
    opt.set_schedule(Some(s.schedule.clone()))?;
    let lr = s.lr;
    let pb = ProgressBar::new(s.steps as u64).with_position(start as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} {bar:28.cyan/blue} {pos:>5}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("progress template")
        .progress_chars("=> "),
    );
    pb.set_prefix(algo.name());
    let unit = task.unit();
    let log_every = (s.steps / 10).max(1);
    // The displayed loss: an EMA of the per-step losses (continued from a checkpoint's history).
    let mut ema: Option<f64> = history.train.iter().fold(None, |e, p| {
        Some(e.map_or(p.1, |e: f64| 0.9 * e + 0.1 * p.1))
    });
    let mut diverged_at = None;
    let t_run = Instant::now();
    for step in start..s.steps {
        let t0 = Instant::now();
        let loss = task.train_loss(step)?;
        let grads = loss.backward()?;
        let t_opt = Instant::now();
        opt.step(&grads)?;
        let opt_ms = t_opt.elapsed().as_secs_f64() * 1e3;
        let l = loss.to_scalar::<f32>()? as f64;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        history.train.push((step + 1, l));
        history.step_ms.push(ms);
        history.opt_ms.push(opt_ms);
        if !l.is_finite() {
            diverged_at = Some(step + 1);
            say(
                &pb,
                &format!(
                    "{}: the loss is {l} at step {}; stopping.",
                    algo.name(),
                    step + 1
                ),
            );
            break;
        }
        let e = match ema {
            None => l,
            Some(e) => 0.9 * e + 0.1 * l,
        };
        ema = Some(e);
        let per_s = task.items_per_step() as f64 / (ms / 1e3);
        pb.set_message(format!(
            "loss {e:.4} | {per_s:.0} {unit}/s | {ms:.0} ms/step | lr {:.2e}",
            opt.learning_rate()
        ));
        pb.inc(1);
        let done = step + 1;
        let last = done == s.steps;
        if s.eval_every > 0 && done % s.eval_every == 0 && !last {
            let ev = task.evaluate(false)?;
            history.val.push((done, ev.loss));
            if let Some(a) = ev.acc {
                history.acc.push((done, a));
            }
            say(
                &pb,
                &format!("{}{}", line(algo, done, s.steps, e, ms), eval_text(&ev)),
            );
        } else if pb.is_hidden() && (done % log_every == 0 || done == start + 1) && !last {
            say(&pb, &line(algo, done, s.steps, e, ms));
        }
        if let Some(dir) = &s.save {
            if s.save_every > 0 && done % s.save_every == 0 && !last {
                save(dir, varmap, opt, s, done, &history)?;
            }
        }
        if s.stop_after == Some(done) && !last {
            pb.finish_and_clear();
            println!(
                "{}: stopped after step {done} of {} (--stop-after).",
                algo.name(),
                s.steps
            );
            if let Some(dir) = &s.save {
                save(dir, varmap, opt, s, done, &history)?;
                println!("Saved model and optimizer state to {}", dir.display());
            }
            return Ok(Outcome {
                algo,
                lr,
                final_train: history.train.last().map_or(f64::NAN, |p| p.1),
                ms_step: median(&history.step_ms),
                ms_opt: median(&history.opt_ms),
                history,
                final_eval: Eval {
                    loss: f64::NAN,
                    acc: None,
                },
                state_bytes: opt.state_bytes(),
                params,
                diverged_at,
            });
        }
    }
    pb.finish_and_clear();
    let trained = history.train.len();
    let final_eval = if diverged_at.is_some() {
        Eval {
            loss: f64::NAN,
            acc: None,
        }
    } else {
        let ev = task.evaluate(true)?;
        if trained > 0 {
            history.val.push((s.steps, ev.loss));
            if let Some(a) = ev.acc {
                history.acc.push((s.steps, a));
            }
        }
        ev
    };
    let n = (trained / 20).clamp(1, 50).min(trained);
    let tail = &history.train[trained - n..];
    let final_train = if n == 0 {
        f64::NAN
    } else {
        tail.iter().map(|p| p.1).sum::<f64>() / n as f64
    };
    let ms_step = median(&history.step_ms);
    let ms_opt = median(&history.opt_ms);
    println!(
        "{}: {} steps in {:.1} s ({:.1} ms/step, {:.1} of them in the optimizer, lr {lr:.2e}); \
         train loss {final_train:.4}{}; optimizer state {}",
        algo.name(),
        s.steps.saturating_sub(start),
        t_run.elapsed().as_secs_f64(),
        ms_step,
        ms_opt,
        eval_text(&final_eval),
        human_bytes(opt.state_bytes())
    );
    if let Some(dir) = &s.save {
        if diverged_at.is_none() && trained > 0 {
            save(dir, varmap, opt, s, s.steps, &history)?;
            println!("Saved model and optimizer state to {}", dir.display());
        }
    }
    Ok(Outcome {
        algo,
        lr,
        history,
        final_train,
        final_eval,
        ms_step,
        ms_opt,
        state_bytes: opt.state_bytes(),
        params,
        diverged_at,
    })
}

fn save(
    dir: &Path,
    varmap: &VarMap,
    opt: &dyn Optimizer,
    s: &Settings,
    step: usize,
    history: &History,
) -> Result<()> {
    let state = CheckpointState {
        example: s.example.to_string(),
        optimizer: opt.algorithm().to_string(),
        step,
        config: s.config.clone(),
        history: history.clone(),
    };
    save_checkpoint(dir, varmap, opt, &state)
}

fn line(algo: Algo, step: usize, steps: usize, loss: f64, ms: f64) -> String {
    format!(
        "{:>9} step {step:>5}/{steps}  train loss {loss:.4}  ({ms:.0} ms/step)",
        algo.name()
    )
}

fn eval_text(ev: &Eval) -> String {
    match ev.acc {
        Some(a) => format!("; val loss {:.4}, val acc {:.2}%", ev.loss, a * 100.0),
        None => format!("; val loss {:.4}", ev.loss),
    }
}

/// The comparison table as Markdown.
pub fn table(outcomes: &[Outcome], classification: bool) -> String {
    let mut t = String::new();
    if classification {
        t.push_str(
            "| optimizer | lr | train loss | val loss | val acc | ms/step | optimizer ms (share) | optimizer state | state / params |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
    } else {
        t.push_str(
            "| optimizer | lr | train loss | val loss | ms/step | optimizer ms (share) | optimizer state | state / params |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
    }
    for o in outcomes {
        let acc = match o.final_eval.acc {
            Some(a) => format!("{:.2}%", a * 100.0),
            None => "-".into(),
        };
        let val = if o.diverged_at.is_some() {
            format!("diverged at step {}", o.diverged_at.unwrap_or(0))
        } else {
            format!("{:.4}", o.final_eval.loss)
        };
        let ratio = o.state_bytes as f64 / (4.0 * o.params as f64);
        let mut row = format!(
            "| {} | {:.0e} | {:.4} | {val} |",
            o.algo.name(),
            o.lr,
            o.final_train
        );
        if classification {
            row.push_str(&format!(" {acc} |"));
        }
        row.push_str(&format!(
            " {:.1} | {:.1} ({:.0}%) | {} ({} B) | {ratio:.2}× |\n",
            o.ms_step,
            o.ms_opt,
            100.0 * o.ms_opt / o.ms_step,
            human_bytes(o.state_bytes),
            o.state_bytes
        ));
        t.push_str(&row);
    }
    t
}

/// One sentence comparing SGD-SaI with AdamW, when both ran.
pub fn sgd_sai_vs_adamw(outcomes: &[Outcome]) -> Option<String> {
    let s = outcomes.iter().find(|o| o.algo == Algo::SgdSai)?;
    let a = outcomes.iter().find(|o| o.algo == Algo::AdamW)?;
    let mut msg = format!(
        "SGD-SaI vs AdamW: final validation loss {:.4} vs {:.4} ({:+.4})",
        s.final_eval.loss,
        a.final_eval.loss,
        s.final_eval.loss - a.final_eval.loss
    );
    if let (Some(x), Some(y)) = (s.final_eval.acc, a.final_eval.acc) {
        msg.push_str(&format!(
            ", accuracy {:.2}% vs {:.2}%",
            x * 100.0,
            y * 100.0
        ));
    }
    msg.push_str(&format!(
        "; optimizer state {} vs {} ({:.3}× of AdamW's).",
        human_bytes(s.state_bytes),
        human_bytes(a.state_bytes),
        s.state_bytes as f64 / a.state_bytes.max(1) as f64
    ));
    Some(msg)
}

/// Prints the comparison and writes `compare.md` and `compare.png` into `out`.
pub fn report(out: &Path, title: &str, outcomes: &[Outcome], classification: bool) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let tab = table(outcomes, classification);
    let vs = sgd_sai_vs_adamw(outcomes);
    println!("\n{title}\n\n{tab}");
    if let Some(v) = &vs {
        println!("{v}");
    }
    let md = out.join("compare.md");
    let mut text = format!("# {title}\n\n{tab}\n");
    if let Some(v) = &vs {
        text.push_str(&format!("{v}\n\n"));
    }
    text.push_str(
        "train loss: mean over the last 5% of steps; val: the final evaluation; ms/step: median \
         wall time of forward, backward and optimizer step; optimizer ms (share): median wall time of \
         the optimizer step alone (on CUDA the time until its launches return) and its share of \
         ms/step; optimizer state: bytes held after training; state / params: state bytes over the f32 parameter bytes.\n",
    );
    std::fs::write(&md, text).map_err(|e| format!("{}: {e}", md.display()))?;
    let png = out.join("compare.png");
    let runs: Vec<(&str, &History)> = outcomes
        .iter()
        .map(|o| (o.algo.name(), &o.history))
        .collect();
    super::plot::loss_curves(&png, title, &runs, classification)?;
    println!("\nWrote {} and {}", md.display(), png.display());
    Ok(())
}

/// The training recipe in words, for titles and run configurations: warmup, schedule floor,
/// clipping, weight decay and the options given.
#[allow(clippy::too_many_arguments)]
pub fn recipe_text(
    warmup: Option<usize>,
    steps: usize,
    min_lr_ratio: f64,
    clip: f64,
    weight_decay: f64,
    gsnr_mode: Option<&str>,
    momentum: Option<f64>,
    lr_for: Option<&super::LrOverrides>,
) -> String {
    let mut t = format!(
        "warmup {} step(s){}, cosine to {}× the peak rate, {}, weight decay {}",
        warmup.unwrap_or_else(|| default_warmup(steps)),
        if warmup.is_none() { " (5%)" } else { "" },
        min_lr_ratio,
        if clip > 0.0 {
            format!("clipping at {clip}")
        } else {
            "no clipping".into()
        },
        weight_decay
    );
    if let Some(m) = gsnr_mode {
        t.push_str(&format!(", SGD-SaI g-SNR {m}"));
    }
    if let Some(m) = momentum {
        t.push_str(&format!(", momentum {m} (SGD-SaI, SGD)"));
    }
    if let Some(o) = lr_for {
        let l: Vec<String> =
            o.0.iter()
                .map(|p| format!("{}={:e}", p.0.name(), p.1))
                .collect();
        t.push_str(&format!(", lr {}", l.join(",")));
    }
    t
}
