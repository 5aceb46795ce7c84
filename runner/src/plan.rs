//! Planning a run: which trials of a sweep (of this shard) are registered, finished,
//! failed before or still to train, and the dry-run table of what a sweep would train.

use results::{NewTrial, Status, Store};

use crate::spec::{self, Sweep, Trial};

/// What registering a sweep's trials found.
pub struct Registered {
    /// Positions (in the sweep's trials) still to train, in order.
    pub todo: Vec<usize>,
    /// Done or diverged before this run.
    pub finished: usize,
    /// Failed before, left alone without `--retry failed`.
    pub failed_before: usize,
    /// Trials of an earlier version of the file, no longer in it.
    pub dropped: usize,
}

/// Registers the trials of shard `shard` (all without one) in sweep record `sweep_id` and
/// sorts them into what to train; trials of the record no longer in the sweep leave it.
pub fn register(
    store: &Store,
    sweep_id: i64,
    trials: &[Trial],
    shard: Option<(u64, u64)>,
    retry_failed: bool,
) -> anyhow::Result<Registered> {
    let in_shard = |id: &str| shard.is_none_or(|(k, n)| spec::shard_of(id, n) == k);
    let (mut todo, mut finished, mut failed_before) = (Vec::new(), 0, 0);
    // Positions are the trial's place in the whole sweep, so that merged shards keep order.
    for (i, t) in trials.iter().enumerate().filter(|(_, t)| in_shard(&t.id)) {
        let status = store.register_trial(
            sweep_id,
            i,
            &NewTrial {
                id: &t.id,
                seed: t.seed,
                label: &t.label,
                config: &t.config,
            },
        )?;
        match status {
            Status::Done | Status::Diverged => finished += 1,
            Status::Failed if !retry_failed => failed_before += 1,
            _ => todo.push(i),
        }
    }
    let ids: Vec<&str> = trials.iter().map(|t| t.id.as_str()).collect();
    let dropped = store.keep_only(sweep_id, &ids, &in_shard)?;
    Ok(Registered {
        todo,
        finished,
        failed_before,
        dropped,
    })
}

/// A trial's label for tables: `-` when nothing varies.
pub fn shown(label: &str) -> &str {
    if label.is_empty() {
        "-"
    } else {
        label
    }
}

/// The dry-run table: every trial and the full components of every cell.
pub fn dry_run(sweep: &Sweep) -> String {
    let cells = sweep.trials.len() / sweep.seeds.len();
    let mut s = format!(
        "sweep {}: {} trials = {cells} cells x {} seeds ({})\n",
        sweep.name,
        sweep.trials.len(),
        sweep.seeds.len(),
        sweep.source.path.display()
    );
    let train = &sweep.train;
    let mut batch = train.batch.to_string();
    if train.gpus_per_trial > 1 {
        batch += &format!(" x {} ranks", train.gpus_per_trial);
    }
    if train.grad_accum > 1 {
        batch += &format!(" x {} micro-batches", train.grad_accum);
    }
    let shapes: Vec<String> = sweep
        .shapes
        .iter()
        .map(|m| {
            let sizes = m.sizes("d_model solved per cell, ");
            match m.scale.as_str() {
                "" => sizes,
                name => format!("{name}: {sizes}"),
            }
        })
        .collect();
    s += &format!(
        "model: {}; vocab {}; train: {} steps of {batch} x {} tokens, eval every {}\n\n",
        shapes.join(" | "),
        sweep.vocab(),
        train.steps,
        train.seq_len,
        train.eval_every()
    );
    s += &format!(
        "{:>4}  {:<16}  {:>4}  {:>4}  label\n",
        "#", "id", "seed", "cell"
    );
    for (i, t) in sweep.trials.iter().enumerate() {
        s += &format!(
            "{i:>4}  {:<16}  {:>4}  {:>4}  {}\n",
            t.id,
            t.seed,
            t.cell_index,
            shown(&t.label)
        );
    }
    if let Some(m) = &sweep.matching {
        s += &format!(
            "\nmatched: {} (each cell's below; widths step by {})\n",
            match_target(m),
            crate::spec::matching::WIDTH_STEP
        );
    }
    // Named shapes with budgets of their own.
    for (m, t) in sweep.shapes.iter().zip(&sweep.targets) {
        match t {
            Some(t) if Some(t) != sweep.matching.as_ref() => {
                s += &format!("shape {}: matched at {}\n", m.scale, match_target(t));
            }
            _ => {}
        }
    }
    s +=
        "\ncells (d_model, non-embedding parameters, forward FLOPs per token as the README counts \
          them, training FLOPs):\n";
    for t in sweep.trials.iter().take(cells) {
        let b = crate::flops::budget(&t.cell, &t.dims, train);
        let p = crate::flops::params(&t.cell, &t.dims);
        let parts: Vec<&str> = t
            .config
            .lines()
            .filter_map(|l| {
                let l = l.trim().trim_end_matches(',');
                registry::Slot::ALL
                    .iter()
                    .any(|s| l.starts_with(&format!("{}: ", s.key())))
                    .then_some(l)
            })
            .collect();
        s += &format!(
            "{:>4}  d_model {:>5}  {:>8} params  {:>8} FLOP/token  {:.3e}  {}\n",
            t.cell_index,
            t.dims.d_model,
            si((p.total - p.embedding) as f64),
            si(b.forward_per_token),
            b.train_flops,
            parts.join("  ")
        );
    }
    s
}

/// 3 significant digits with an SI prefix: `215 k`, `3.38 G`.
fn si(v: f64) -> String {
    let (scaled, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(p, _)| v >= *p)
        .map_or((v, ""), |(p, name)| (v / p, name));
    let digits = if scaled >= 100.0 {
        0
    } else if scaled >= 10.0 {
        1
    } else {
        2
    };
    format!("{scaled:.digits$} {prefix}")
}

/// `5.00e7 non-embedding parameters (±2.0%)`.
fn match_target(m: &crate::spec::matching::MatchSpec) -> String {
    use crate::spec::matching::MatchSpec;
    let (v, tol) = match m {
        MatchSpec::Params {
            non_embedding,
            total,
            tolerance,
        } => (non_embedding.or(*total).unwrap_or(0.0), *tolerance),
        MatchSpec::Flops {
            per_token,
            tolerance,
        } => (*per_token, *tolerance),
    };
    format!("{v:.3e} {} (±{:.1}%)", m.what(), 100.0 * tol)
}
