//! A row of the bench's table, and the table: the CPU, its measured peaks,
//! each row's speed, memory and share of the peak for its precision.

use tuneforge::memory;

/// One measured configuration, as a row's process reports it to the bench.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub name: String,
    /// The model measured (`--model`, or the shape of the `gpu` suite's rows).
    #[serde(default)]
    pub model: String,
    /// Timed repetitions the seconds are the fastest of.
    #[serde(default)]
    pub reps: usize,
    pub seconds: f64,
    pub tokens_per_second: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    #[serde(default)]
    pub peak_gpu_mb: Option<f64>,
    pub gflops: Option<f64>,
    /// The frozen base's precision (`f32`, `bf16`), where the row says.
    #[serde(default)]
    pub base: String,
    /// A line printed under the table, where the row has more to say.
    #[serde(default)]
    pub note: Option<String>,
    /// Where a timed call's time went (`--profile`).
    #[serde(default)]
    pub profile: Option<Profile>,
}

/// Where one timed call's time went, by [`tuneforge::profile::Stage`]:
/// seconds per call, counted per thread, against the call's wall time
/// times the threads.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// Each stage's name and seconds per call.
    pub stages: Vec<(String, f64)>,
    /// Wall seconds per call times the threads.
    pub thread_seconds: f64,
}

impl Profile {
    /// `spent` over `calls` timed calls that took `wall` seconds in all.
    pub fn per_call(
        spent: Vec<(tuneforge::profile::Stage, std::time::Duration)>,
        calls: usize,
        wall: f64,
    ) -> Self {
        let calls = calls as f64;
        Self {
            stages: spent
                .into_iter()
                .map(|(stage, t)| (stage.name().to_string(), t.as_secs_f64() / calls))
                .collect(),
            thread_seconds: wall / calls * tuneforge::threads::workers() as f64,
        }
    }

    /// One line: each stage's seconds and share of the thread time, then
    /// what no stage counted ("elsewhere": residual sums, copies, the
    /// embeddings, the rest of candle's ops).
    pub fn describe(&self) -> String {
        let share = |s: f64| 100.0 * s / self.thread_seconds;
        let counted: f64 = self.stages.iter().map(|(_, s)| s).sum();
        let mut parts: Vec<String> = self
            .stages
            .iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|(name, s)| format!("{name} {s:.3} s ({:.0}%)", share(*s)))
            .collect();
        let rest = (self.thread_seconds - counted).max(0.0);
        parts.push(format!("elsewhere {rest:.3} s ({:.0}%)", share(rest)));
        format!(
            "{:.3} thread-seconds per call: {}",
            self.thread_seconds,
            parts.join(", ")
        )
    }
}

impl Row {
    /// A row that took `seconds`, with this process's peak RSS so far.
    pub fn new(name: &str, seconds: f64) -> Self {
        Self {
            name: name.into(),
            model: String::new(),
            reps: 0,
            seconds,
            tokens_per_second: None,
            peak_rss_mb: memory::peak_rss_bytes().map(|b| b as f64 / 1e6),
            peak_gpu_mb: None,
            gflops: None,
            base: String::new(),
            note: None,
            profile: None,
        }
    }

    /// A row for `tokens` processed per `seconds`, at `flops_per_token`.
    pub fn throughput(name: &str, seconds: f64, tokens: usize, flops_per_token: f64) -> Self {
        Self {
            tokens_per_second: Some(tokens as f64 / seconds),
            gflops: Some(flops_per_token * tokens as f64 / seconds / 1e9),
            ..Self::new(name, seconds)
        }
    }
}

/// Prints the rows as a table under the CPU's name and measured peaks
/// (`(f32 FMA, bf16 dot)` GFLOP/s); `qlora` says the rows hold quantized
/// bases.
pub fn print(rows: &[Row], qlora: bool, (f32_peak, bf16_peak): (Option<f64>, Option<f64>)) {
    let features = tuneforge::cpu::features();
    let gflops = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.1} GFLOP/s"));
    let bf16_name = match features.bf16_kernel().is_some_and(|k| k.on_tiles()) {
        true => "bf16 tiles (AMX-BF16)",
        false => "bf16 dot",
    };
    println!(
        "CPU: {} ({}), {} threads; measured peaks: f32 FMA {}, {bf16_name} {}",
        tuneforge::cpu::model_name().unwrap_or_else(|| "unknown".into()),
        features.describe(),
        tuneforge::threads::workers(),
        gflops(f32_peak),
        gflops(bf16_peak),
    );
    match features.bf16_kernel() {
        Some(kernel) => println!(
            "(bf16 base rows multiply the frozen weights with {kernel} products, \
             the activations rounded to bf16: their share is of the {bf16_name} peak)\n"
        ),
        None => println!(
            "(bf16 base rows hold the frozen weights in bf16 and multiply them in f32, \
             so their share is of the f32 FMA peak)\n"
        ),
    }
    if let (true, Some(kernel)) = (qlora, features.int8_kernel()) {
        println!(
            "(rows with a quantized base multiply Q8_0, Q4_x, Q5_x and Q2_K to Q6_K \
             blocks forward with {kernel} products, the activations rounded to \
             two 8-bit digits per group; \
             their share is of the f32 FMA peak)\n"
        );
    }
    let gpu = rows.iter().any(|r| r.peak_gpu_mb.is_some());
    let memory_header = if gpu {
        "peak GPU (MB)"
    } else {
        "peak RSS (MB)"
    };
    println!(
        "| {:<46} | {:>8} | {:>9} | {:>13} | {:>8} | {:>6} |",
        "configuration", "s/step", "tokens/s", memory_header, "GFLOP/s", "peak"
    );
    println!(
        "|{:-<48}|{:->10}|{:->11}|{:->15}|{:->10}|{:->8}|",
        "", "", "", "", "", ""
    );
    let show =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in rows {
        let memory = if gpu { r.peak_gpu_mb } else { r.peak_rss_mb };
        let peak = match (r.base.as_str(), features.bf16_kernel()) {
            ("bf16", Some(_)) => bf16_peak,
            _ => f32_peak,
        };
        let share = r
            .gflops
            .zip(peak)
            .map(|(g, p)| format!("{:.0}%", 100.0 * g / p));
        println!(
            "| {:<46} | {:>8.3} | {:>9} | {:>13} | {:>8} | {:>6} |",
            r.name,
            r.seconds,
            show(r.tokens_per_second, 1),
            show(memory, 0),
            show(r.gflops, 1),
            share.unwrap_or_else(|| "-".into())
        );
    }
    for note in rows.iter().filter_map(|r| r.note.as_ref()) {
        println!("\n{note}");
    }
    for r in rows {
        if let Some(profile) = &r.profile {
            println!("\n{}: {}", r.name, profile.describe());
        }
    }
}
