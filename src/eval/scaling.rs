//! How much data does fine-tuning need? For each training-set size n, an
//! adapter trained on n training examples with the run's own settings, and
//! retrieved few-shot drawing only from the same n, both scored on the
//! held-out set. The subsets are nested (the first n of one shuffled order),
//! and each n's run folder is kept and reused when `compare` runs again.

use super::compare::CompareConfig;
use super::comparison::VariantReport;
use super::retrieve::Retriever;
use super::score::score;
use super::significance::{right, BOOTSTRAP_RESAMPLES};
use super::stats::PairedComparison;
use super::variants::{retrieved_few_shot, Shots, Variant};
use super::HeldOut;
use crate::data::{Dataset, Record};
use crate::pretrained::Model;
use crate::rng::Rng;
use crate::train::{holds_run, run_folder_of, RunConfig, Trainer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A training-set size of the scaling curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Size {
    /// The first n examples of the shuffled training set.
    Count(usize),
    /// All of it.
    All,
}

/// Parses `25,50,100,200,all`.
pub fn parse_sizes(text: &str) -> Result<Vec<Size>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "all" => Ok(Size::All),
            _ => match s.parse::<usize>() {
                Ok(0) | Err(_) => bail!(
                    "--scaling {text}: '{s}' is not a training-set size (a whole number of at \
                     least 1, or 'all')"
                ),
                Ok(n) => Ok(Size::Count(n)),
            },
        })
        .collect()
}

/// What to run for the scaling curve.
#[derive(Debug, Clone)]
pub struct ScalingConfig {
    /// The training-set sizes.
    pub sizes: Vec<Size>,
    /// The fine-tuning run whose settings (`train_config.toml`) each size trains with.
    pub run: PathBuf,
    /// Where each size's run folder goes (`n-25/`, ...).
    pub dir: PathBuf,
}

impl ScalingConfig {
    /// The curve at `sizes` (`25,50,all`), training with the settings of the
    /// first of `adapters` (a run folder), its run folders under `out/scaling`.
    pub fn new(sizes: &str, adapters: &[PathBuf], out: &Path) -> Result<Self> {
        let Some(run) = adapters.first() else {
            bail!(
                "--scaling needs a fine-tuning run folder as --adapter: its train_config.toml \
                 gives the settings each size trains with"
            );
        };
        Ok(Self {
            sizes: parse_sizes(sizes)?,
            // A run's best/ adapter trains with its run's settings.
            run: run_folder_of(run).unwrap_or_else(|| run.clone()),
            dir: out.join("scaling"),
        })
    }
}

/// One exact-match rate with its Wilson 95% interval.
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    /// Share of exact matches.
    pub exact_match: f64,
    /// Its Wilson 95% interval.
    pub interval: (f64, f64),
}

impl From<&VariantReport> for Accuracy {
    fn from(r: &VariantReport) -> Self {
        Self {
            exact_match: r.exact_match,
            interval: r.exact_match_interval,
        }
    }
}

/// One training-set size's results.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingPoint {
    /// Training examples used.
    pub n: usize,
    /// Its run folder.
    pub run: PathBuf,
    /// Whether the run folder was reused from an earlier `compare`.
    pub reused: bool,
    /// The adapter trained on the n examples.
    pub fine_tuned: Accuracy,
    /// Retrieved few-shot from the same n examples.
    pub retrieved: Accuracy,
    /// Fine-tuned minus retrieved few-shot, paired over the held-out
    /// examples (95%).
    pub paired: PairedComparison,
}

/// Accuracy against the number of training examples.
#[derive(Debug, Clone, Serialize)]
pub struct Scaling {
    /// The worked examples per retrieved few-shot prompt.
    pub shots: usize,
    /// Each size, smallest first.
    pub points: Vec<ScalingPoint>,
    /// The smallest n from which fine-tuning is ahead of retrieved few-shot
    /// at every size tried (a lead that a larger n loses again is noise).
    pub crossover: Option<usize>,
    /// The smallest n from which fine-tuning is clearly ahead (the paired
    /// test at 5%) at every size tried.
    pub clearly_from: Option<usize>,
}

impl Scaling {
    /// The curve in one sentence: the sizes tried and from which n on
    /// fine-tuning is ahead of retrieved few-shot, and clearly so (the
    /// verdict and the HTML report both say it this way).
    pub fn summary(&self) -> String {
        let tried: Vec<String> = self.points.iter().map(|p| p.n.to_string()).collect();
        let same = "retrieved few-shot from the same examples";
        let lead = match (self.crossover, self.clearly_from) {
            (None, _) => format!("is not ahead of {same} at the largest n"),
            (Some(n), Some(clear)) => format!(
                "is ahead of {same} from n = {n} on, and clearly (paired, 5%) from n = {clear} on"
            ),
            (Some(n), None) => {
                format!("is ahead of {same} from n = {n} on, but not clearly (paired, 5%) at any n")
            }
        };
        format!(
            "On the scaling curve (n = {}), fine-tuning {lead}.",
            tried.join(", ")
        )
    }
}

/// The smallest n of the sizes from which `ahead` holds at every size up
/// to the largest (`points` smallest first).
fn ahead_from(points: &[ScalingPoint], ahead: impl Fn(&ScalingPoint) -> bool) -> Option<usize> {
    points
        .iter()
        .rev()
        .take_while(|p| ahead(p))
        .last()
        .map(|p| p.n)
}

/// What a size's run folder was trained from: reused only when it matches.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Stamp {
    n: usize,
    base_model: String,
    /// The settings (`train_config.toml`) and the subset's records, hashed.
    digest: String,
}

const STAMP: &str = "scaling.json";

/// Trains (or reuses) an adapter per size and scores it and retrieved
/// few-shot from the same examples on `held_out`. Sizes larger than the
/// training set are skipped with a note in `notes`.
pub fn scaling(
    model: &mut Model,
    data: &Dataset,
    held_out: &[HeldOut],
    scaling: &ScalingConfig,
    config: &CompareConfig,
    notes: &mut Vec<String>,
) -> Result<Scaling> {
    let settings = RunConfig::read(&scaling.run).with_context(|| {
        format!(
            "--scaling trains with the settings of the run folder given as --adapter ({})",
            scaling.run.display()
        )
    })?;
    let total = data.train.len();
    let mut sizes = Vec::new();
    for size in &scaling.sizes {
        match *size {
            Size::All => sizes.push(total),
            Size::Count(n) if n <= total => sizes.push(n),
            Size::Count(n) => notes.push(format!(
                "scaling: n={n} skipped, the training set ({}) has only {total} examples",
                data.source.display()
            )),
        }
    }
    sizes.sort_unstable();
    sizes.dedup();
    let mut order: Vec<usize> = (0..total).collect();
    Rng::new(settings.train.seed).shuffle(&mut order);
    let shots = config.shots.max(1);
    crate::lora::detach(&mut model.lm);
    let mut points = Vec::new();
    for n in sizes {
        let subset: Vec<Record> = order[..n].iter().map(|&i| data.train[i].clone()).collect();
        let dir = scaling.dir.join(format!("n-{n}"));
        let reused = train_size(model, &settings, data, &subset, &dir, config.progress)?;
        let pool = subset
            .iter()
            .map(HeldOut::from_record)
            .collect::<Result<Vec<_>>>()
            .context("--scaling: retrieved few-shot needs question-answer records")?;
        let k = shots.min(n);
        let bar = super::score::progress_bar(config.progress, 2 * held_out.len());
        crate::lora::detach(&mut model.lm);
        let retrieved = retrieved_few_shot(
            format!("retrieved few-shot (k={k}, BM25) from n={n}"),
            &Retriever::new(&pool),
            held_out,
            k,
        );
        let retrieved = score(model, &retrieved, held_out, config, &bar)?;
        model.load_adapter(&dir)?;
        let tuned = Variant::new(
            format!("fine-tuned on n={n}"),
            Some(dir.clone()),
            None,
            Shots::Fixed(Vec::new()),
        );
        let tuned = score(model, &tuned, held_out, config, &bar)?;
        crate::lora::detach(&mut model.lm);
        bar.finish_and_clear();
        let paired = PairedComparison::new(
            &right(&tuned),
            &right(&retrieved),
            BOOTSTRAP_RESAMPLES,
            config.seed,
            0.95,
        );
        points.push(ScalingPoint {
            n,
            run: dir,
            reused,
            fine_tuned: (&tuned).into(),
            retrieved: (&retrieved).into(),
            paired,
        });
    }
    Ok(Scaling {
        shots,
        crossover: ahead_from(&points, |p| {
            p.fine_tuned.exact_match > p.retrieved.exact_match
        }),
        clearly_from: ahead_from(&points, |p| p.paired.winner() == 1),
        points,
    })
}

/// Trains an adapter on `subset` into `dir` with `settings`, unless `dir`
/// already holds one trained from the same settings and examples (then
/// returns true).
fn train_size(
    model: &Model,
    settings: &RunConfig,
    data: &Dataset,
    subset: &[Record],
    dir: &Path,
    progress: bool,
) -> Result<bool> {
    let mut hasher = Sha256::new();
    hasher.update(toml::to_string(settings)?.as_bytes());
    for record in subset {
        hasher.update(format!("{record:?}\n").as_bytes());
    }
    let stamp = Stamp {
        n: subset.len(),
        base_model: model.repo_id().unwrap_or(&model.source.name).to_string(),
        digest: format!("{:x}", hasher.finalize()),
    };
    let stamp_path = dir.join(STAMP);
    let saved: Option<Stamp> = std::fs::read(&stamp_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if saved.as_ref() == Some(&stamp) && dir.join("adapter_model.safetensors").is_file() {
        return Ok(true);
    }
    if holds_run(dir) {
        Trainer::overwrite(dir)?;
    }
    let mut train = settings.train.clone();
    train.progress = progress;
    let mut trainer = Trainer::new(model.clone(), settings.lora.clone(), train, dir)?;
    trainer.train(&Dataset {
        train: subset.to_vec(),
        valid: data.valid.clone(),
        test: Vec::new(),
        source: data.source.clone(),
        // The subset's records stand at other places than the file's.
        origins: Default::default(),
    })?;
    crate::atomic::write(
        &stamp_path,
        serde_json::to_string_pretty(&stamp)?.as_bytes(),
    )?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A size's point with the two accuracies (intervals and the paired
    /// test left empty).
    fn point(n: usize, tuned: f64, retrieved: f64) -> ScalingPoint {
        let accuracy = |exact_match| Accuracy {
            exact_match,
            interval: (0.0, 1.0),
        };
        ScalingPoint {
            n,
            run: PathBuf::new(),
            reused: false,
            fine_tuned: accuracy(tuned),
            retrieved: accuracy(retrieved),
            paired: PairedComparison::new(&[], &[], 0, 0, 0.95),
        }
    }

    /// A lead counts from the smallest n after which it never drops.
    #[test]
    fn the_crossover_is_where_the_lead_holds_to_the_largest_size() {
        let ahead = |p: &ScalingPoint| p.fine_tuned.exact_match > p.retrieved.exact_match;
        // Ahead at 25 by chance, behind at 50, ahead from 100 on.
        let points = [
            point(25, 0.3, 0.2),
            point(50, 0.2, 0.3),
            point(100, 0.5, 0.3),
            point(200, 0.7, 0.3),
        ];
        assert_eq!(ahead_from(&points, ahead), Some(100));
        // Behind at the largest size: no crossover.
        assert_eq!(ahead_from(&points[..2], ahead), None);
        assert_eq!(ahead_from(&[], ahead), None);
    }

    /// The sentence names the sizes, the crossover and where the lead is
    /// clear, or that there is none.
    #[test]
    fn the_summary_says_where_fine_tuning_leads() {
        let mut curve = Scaling {
            shots: 4,
            points: vec![point(25, 0.5, 0.4), point(100, 0.6, 0.3)],
            crossover: Some(25),
            clearly_from: Some(100),
        };
        assert_eq!(
            curve.summary(),
            "On the scaling curve (n = 25, 100), fine-tuning is ahead of retrieved few-shot \
             from the same examples from n = 25 on, and clearly (paired, 5%) from n = 100 on."
        );
        curve.clearly_from = None;
        assert!(curve
            .summary()
            .ends_with(", but not clearly (paired, 5%) at any n."));
        curve.crossover = None;
        assert!(curve
            .summary()
            .contains("is not ahead of retrieved few-shot"));
    }

    #[test]
    fn sizes_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_sizes("25, 50,all").unwrap(),
            [Size::Count(25), Size::Count(50), Size::All]
        );
        for bad in ["25,x", "0", "-3"] {
            let err = parse_sizes(bad).unwrap_err().to_string();
            assert!(err.contains("is not a training-set size"), "{err}");
        }
    }
}
