use std::path::Path;

use candle_core::{Device, Var};
use registry::Role;

use super::*;
use crate::spec::{Source, Sweep};
use crate::train::{self, Observer, Outcome, Setting, ValSet};

const SECOND: Duration = Duration::from_secs(1);

/// Runs `f` once per rank of a CPU group of `world`, in threads, and returns each result.
fn on_ranks<T: Send>(world: usize, timeout: Duration, f: impl Fn(Local) -> T + Sync) -> Vec<T> {
    let hub = Arc::new(Hub::new(world, timeout));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (hub, f) = (&hub, &f);
                s.spawn(move || f(hub.member(r)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

use local::Local;

#[test]
fn the_cpu_group_sums_in_rank_order_and_broadcasts_the_root() {
    let out = on_ranks(3, 10 * SECOND, |g| {
        let r = g.rank() as f32;
        let mine = Tensor::new(&[r + 1.0, 10.0 * (r + 1.0)], &Device::Cpu).unwrap();
        let sum = g.sum(&mine).unwrap().to_vec1::<f32>().unwrap();
        // Two collectives in a row: the second must not read the first's values.
        let again = g
            .sum(&(mine * 2.0).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let root = Tensor::new(&[[r, -r]], &Device::Cpu).unwrap();
        let b = g.broadcast(&root, 1).unwrap();
        (sum, again, b.dims().to_vec(), b.to_vec2::<f32>().unwrap())
    });
    for (sum, again, dims, b) in out {
        assert_eq!(sum, vec![6.0, 60.0]);
        assert_eq!(again, vec![12.0, 120.0]);
        assert_eq!(dims, vec![1, 2]);
        assert_eq!(b, vec![vec![1.0, -1.0]]);
    }
}

/// Parameters of 6, 4 and 1 values (and one without a gradient), with gradients set by hand.
fn params_with_grads(rank: usize) -> (Vec<Param>, GradStore) {
    let dev = Device::Cpu;
    let shapes: [&[usize]; 4] = [&[2, 3], &[4], &[1], &[2]];
    let params: Vec<Param> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| Param {
            name: format!("p{i}"),
            var: Var::zeros(*s, DType::F32, &dev).unwrap(),
            role: Role::Hidden,
        })
        .collect();
    // A gradient store with the first three: backward of sum(w * c) gives c.
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for (i, p) in params.iter().take(3).enumerate() {
        let n = p.var.elem_count();
        let c: Vec<f32> = (0..n).map(|j| (rank * 100 + i * 10 + j) as f32).collect();
        let c = Tensor::from_vec(c, p.var.shape(), &dev).unwrap();
        loss = (loss + (p.var.as_tensor() * c).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = train::backward(&loss, &params).unwrap();
    (params, grads)
}

#[test]
fn averaging_gives_every_rank_the_mean_gradient_bucket_by_bucket() {
    // Buckets of at most 5 values: [p0] alone (6 > 5, one parameter per bucket at least),
    // then [p1, p2] (4 + 1). Rank r's gradient of p_i, element j is 100 r + 10 i + j, so the
    // mean over ranks 0 and 1 is 50 + 10 i + j, and scale 1/2 of the sum says it.
    let out = on_ranks(2, 10 * SECOND, |g| {
        let (params, mut grads) = params_with_grads(g.rank());
        average_gradients(&mut grads, &params, &g, 0.5, 5).unwrap();
        let got: Vec<Option<Vec<f32>>> = params
            .iter()
            .map(|p| {
                grads
                    .get(p.var.as_tensor())
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
        let shapes: Vec<Option<Vec<usize>>> = params
            .iter()
            .map(|p| grads.get(p.var.as_tensor()).map(|t| t.dims().to_vec()))
            .collect();
        (got, shapes)
    });
    let want =
        |i: usize, n: usize| -> Vec<f32> { (0..n).map(|j| (50 + 10 * i + j) as f32).collect() };
    for (got, shapes) in out {
        assert_eq!(got[0].as_deref(), Some(&want(0, 6)[..]));
        assert_eq!(got[1].as_deref(), Some(&want(1, 4)[..]));
        assert_eq!(got[2].as_deref(), Some(&want(2, 1)[..]));
        assert_eq!(got[3], None, "a parameter without a gradient gained one");
        assert_eq!(shapes[0], Some(vec![2, 3]));
    }
}

#[test]
fn one_rank_only_scales() {
    let (params, mut grads) = params_with_grads(1);
    average_gradients(&mut grads, &params, &Solo, 0.25, BUCKET_ELEMS).unwrap();
    let g = grads.get(params[1].var.as_tensor()).unwrap();
    // (100 + 10 + j) / 4
    assert_eq!(g.to_vec1::<f32>().unwrap(), vec![27.5, 27.75, 28.0, 28.25]);
}

#[test]
fn a_failed_rank_ends_the_others_collectives_with_its_reason() {
    let out = on_ranks(2, 30 * SECOND, |g| {
        let started = Instant::now();
        if g.rank() == 1 {
            g.hub.fail("rank 1 (cpu): out of memory");
            return (None, started.elapsed());
        }
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        (Some(g.sum(&t).unwrap_err().to_string()), started.elapsed())
    });
    let (err, waited) = &out[0];
    let err = err.as_deref().unwrap();
    assert!(err.contains("rank 1 (cpu): out of memory"), "{err}");
    assert!(*waited < 10 * SECOND, "waited {waited:?} for a failed rank");
}

#[test]
fn a_collective_nobody_joins_times_out() {
    let out = on_ranks(2, Duration::from_millis(300), |g| {
        if g.rank() == 1 {
            return None;
        }
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        Some(g.sum(&t).unwrap_err().to_string())
    });
    let err = out[0].as_deref().unwrap();
    assert!(err.contains("rank 0 waited 0 s at a collective"), "{err}");
}

/// (step, metric, value) rows.
type Rows = Vec<(usize, String, f64)>;

/// Records the training loss and the validation loss of every step.
#[derive(Default)]
struct Curve(Vec<(usize, String, f64)>);

impl Observer for Curve {
    fn record(&mut self, step: usize, name: &str, value: f64) -> Result<()> {
        if name == "train/loss" || name == "val/loss" || name == "grad_norm" {
            self.0.push((step, name.to_string(), value));
        }
        Ok(())
    }
}

/// The loss curve of one trial trained with `sets` on `devices` (one rank each), as rank 0
/// records it, and whether every rank ended with the same weights.
fn curve(sets: &[&str], devices: &[&str]) -> (Rows, bool) {
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare/input.txt");
    let text = format!(
        "Sweep(name: \"dp\", seeds: [5], data: Text(path: {:?}),\n\
         train: (steps: 10, batch: 4, seq_len: 16, eval_every: 5, eval_batches: 3, \
         log_every: 1),\n\
         model: (d_model: 16, n_layers: 2),\n\
         grid: (attention: [GatedGqa(heads: 2, kv_heads: 1)], ffn: [Relu2], \
         residual: [Mhc(streams: 2)], optimizer: [AdamW], schedule: [Cosine]))",
        corpus.display().to_string()
    );
    let mut source = Source::from_text(Path::new("dp.ron"), text);
    for set in sets {
        source.apply_set(set).unwrap();
    }
    let sweep = Sweep::from_source(source).unwrap();
    let data = crate::data::Dataset::load(&sweep.data, &sweep.source, 16).unwrap();
    let trial = &sweep.trials[0];
    let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    let body = |rank: Rank| -> anyhow::Result<(Rows, Vec<f32>)> {
        let val = ValSet::new(&data.val, data.tokenizer, &sweep.train, &rank.device)?;
        let model = train::build(trial, &trial.dims, sweep.train.precision, &rank.device)?;
        let setting = Setting {
            spec: &sweep.train,
            data: &data,
            val: &val,
            evals: &[],
            benchmarks: &[],
            device: &rank.device,
            group: rank.group.as_ref(),
        };
        let mut log = Curve::default();
        let out = train::train(trial, &model, setting, &mut log, None, None)?;
        assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
        let mut weights = Vec::new();
        for p in model.params() {
            weights.extend(p.var.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((log.0, weights))
    };
    let never = |why: &str| -> std::convert::Infallible { panic!("abandoned: {why}") };
    let ranks = run_ranks(&devices, 60 * SECOND, &body, &never)
        .unwrap()
        .unwrap();
    let same = ranks.iter().all(|(_, w)| *w == ranks[0].1);
    (ranks.into_iter().next().unwrap().0, same)
}

#[test]
fn two_ranks_of_half_the_batch_and_two_micro_batches_follow_the_one_rank_curve() {
    let (whole, _) = curve(&[], &["cpu"]);
    let (ranks, same) = curve(
        &["train.batch=2", "train.gpus_per_trial=2"],
        &["cpu", "cpu"],
    );
    let (accum, _) = curve(&["train.batch=2", "train.grad_accum=2"], &["cpu"]);
    assert!(same, "the two ranks ended with different weights");
    assert_eq!(
        whole.len(),
        10 * 2 + 2,
        "10 steps of loss and norm, 2 evaluations"
    );
    for other in [&ranks, &accum] {
        assert_eq!(other.len(), whole.len());
        for ((s1, n1, v1), (s2, n2, v2)) in whole.iter().zip(other.iter()) {
            assert_eq!((s1, n1), (s2, n2));
            // f32 sums in another order: the curves agree to rounding (largest gap seen
            // 8.6e-8 relative; a wrong slice of the batch is 2e-3 off at step 1).
            assert!(
                (v1 - v2).abs() <= 1e-6 * v1.abs().max(1.0),
                "{n1} at step {s1}: {v1} vs {v2}"
            );
        }
    }
    // And the curve is a training curve: the batch halves do differ (a wrong slice, say the
    // same half on both ranks, would not match above).
    let first = whole[0].2;
    let last = whole
        .iter()
        .rev()
        .find(|(_, n, _)| n == "train/loss")
        .unwrap()
        .2;
    assert!(last < first, "loss {first} -> {last}");
}

#[test]
fn a_failing_rank_fails_the_trial_with_its_reason_and_the_others_stop() {
    let devices = vec!["cpu".to_string(), "cpu".to_string()];
    let body = |rank: Rank| -> anyhow::Result<usize> {
        let t = Tensor::new(&[1f32], &rank.device)?;
        for step in 0.. {
            if rank.group.rank() == 1 && step == 3 {
                anyhow::bail!("out of memory at step {step}");
            }
            rank.group.sum(&t)?;
        }
        unreachable!()
    };
    let never = |why: &str| -> std::convert::Infallible { panic!("abandoned: {why}") };
    let started = Instant::now();
    let out = run_ranks(&devices, 30 * SECOND, &body, &never).unwrap();
    assert_eq!(out.unwrap_err(), "rank 1 (cpu): out of memory at step 3");
    assert!(started.elapsed() < 10 * SECOND);
}

#[test]
fn ranks_share_normuons_orthogonalizations_and_take_the_one_rank_step() {
    // Four groups of hidden matrices (two of one shape, one tall, one square, one wide) and
    // NorMuon, two steps with the same gradients: each rank orthogonalizes the groups the
    // cost balance gives it (both ranks get some: the two tall and wide ones take blocks on
    // the Gram matrix), the group of two cut into a slice a rank, and broadcasts them; every
    // rank ends with the weights the single-rank step gives.
    let shapes = [(6usize, 10usize), (6, 10), (10, 4), (8, 8), (4, 12)];
    let run = |ranks: Option<&dyn registry::Ranks>| -> Vec<Vec<f32>> {
        let params: Vec<Param> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                let values: Vec<f32> = (0..r * c)
                    .map(|j| ((i * 31 + j * 7) % 17) as f32 / 17.0 - 0.5)
                    .collect();
                Param {
                    name: format!("w{i}"),
                    var: Var::from_vec(values, (r, c), &Device::Cpu).unwrap(),
                    role: Role::Hidden,
                }
            })
            .collect();
        let entry = registry::lookup(registry::Slot::Optimizer, "NorMuon").unwrap();
        let registry::Component::Optimizer(cfg) = entry.parse("(lr: 0.05)").unwrap().component
        else {
            unreachable!("an optimizer entry")
        };
        let mut opt = cfg.build(&params, candle_core::DType::F32).unwrap();
        for step in 0..2 {
            let mut loss = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap();
            for (i, p) in params.iter().enumerate() {
                let (r, c) = shapes[i];
                let g: Vec<f32> = (0..r * c)
                    .map(|j| ((i + step * 5 + j * 3) % 11) as f32 - 5.0)
                    .collect();
                let g = Tensor::from_vec(g, (r, c), &Device::Cpu).unwrap();
                loss = (loss + (p.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            match ranks {
                Some(r) => opt.step_shared(&grads, 1.0, r).unwrap(),
                None => opt.step(&grads, 1.0).unwrap(),
            }
        }
        params
            .iter()
            .map(|p| {
                p.var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let alone = run(None);
    // On three ranks the group of two is cut into two slices of one matrix.
    for world in [2, 3] {
        let shared = on_ranks(world, 30 * SECOND, |g| run(Some(&AsRanks(&g))));
        for (rank, weights) in shared.iter().enumerate() {
            for (i, (a, b)) in alone.iter().zip(weights).enumerate() {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-6, "{world} ranks: rank {rank}, matrix {i}: {d}");
            }
        }
    }
    // The step moved the matrices: not the identity, which would pass trivially.
    let start = (0..60).map(|j| ((j * 7) % 17) as f32 / 17.0 - 0.5);
    assert!(alone[0]
        .iter()
        .zip(start)
        .any(|(a, b)| (a - b).abs() > 1e-3));
}
