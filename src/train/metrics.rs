//! What training records: `metrics.jsonl` (one line per step and per
//! evaluation) and a loss-curve SVG of train and validation loss.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Event {
    /// An optimizer update.
    Step {
        /// The update number (1-based).
        step: usize,
        /// The epoch it belongs to (0-based).
        epoch: usize,
        /// Mean cross-entropy per trained token.
        loss: f64,
        /// The learning rate used.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Trained tokens in the update.
        trained_tokens: usize,
        /// Non-padding tokens processed.
        tokens: usize,
        /// Non-padding tokens per second over this update.
        tokens_per_second: f64,
        /// Seconds since training started (resumed runs include earlier time).
        elapsed: f64,
    },
    /// An evaluation on the validation set.
    Eval {
        /// The update after which it ran.
        step: usize,
        /// Mean cross-entropy per trained token.
        valid_loss: f64,
    },
}

impl Event {
    /// The update the event belongs to.
    pub fn step(&self) -> usize {
        match self {
            Event::Step { step, .. } | Event::Eval { step, .. } => *step,
        }
    }
}

/// Appends events to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    events: Vec<Event>,
}

impl MetricsLog {
    /// A log at `path`, keeping existing events up to `keep_through_step` (for a
    /// resumed run) and dropping the rest.
    pub fn open(path: &Path, keep_through_step: Option<usize>) -> Result<Self> {
        let mut events = Vec::new();
        if let (Some(limit), true) = (keep_through_step, path.is_file()) {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let e: Event = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a metrics line", path.display(), i + 1))?;
                if e.step() <= limit {
                    events.push(e);
                }
            }
        }
        let log = Self {
            path: path.to_path_buf(),
            events,
        };
        let mut text = String::new();
        for e in &log.events {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        }
        crate::atomic::write(path, text.as_bytes())?;
        Ok(log)
    }

    /// Records an event.
    pub fn push(&mut self, event: Event) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(&event)?)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.events.push(event);
        Ok(())
    }

    /// Every event so far.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Draws train and validation loss against the step into an SVG file.
    pub fn plot(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let train: Vec<(f64, f64)> = self
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Step { step, loss, .. } => Some((*step as f64, *loss)),
                _ => None,
            })
            .collect();
        let valid: Vec<(f64, f64)> = self
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Eval { step, valid_loss } => Some((*step as f64, *valid_loss)),
                _ => None,
            })
            .collect();
        let all = train.iter().chain(&valid);
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
        let y_max = all.clone().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut chart = ChartBuilder::on(&root)
                .caption("loss", ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0f64..x_max, 0f64..y_max)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc("cross-entropy")
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .draw_series(LineSeries::new(train, &BLUE))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("train")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
            chart
                .draw_series(LineSeries::new(valid.clone(), &RED))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("valid")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
            chart
                .draw_series(valid.iter().map(|&p| Circle::new(p, 3, RED.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        crate::atomic::write(path, svg.as_bytes())
    }
}
