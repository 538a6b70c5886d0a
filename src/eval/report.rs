//! The comparison's reports: a Markdown table (terminal and `report.md`), a
//! self-contained `report.html` with charts and side-by-side answers, and
//! `report.json` for machines.

use super::compare::Comparison;
use anyhow::{anyhow, Result};
use std::path::Path;

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
}

/// The scores and costs as a Markdown table, with the verdict.
pub fn markdown(c: &Comparison) -> String {
    let mut s = String::from("| variant | exact match (95% CI) | JSON valid | fields right | token F1 | NLL | perplexity | prompt tokens | latency (s) | tokens/s |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for v in &c.variants {
        s.push_str(&format!(
            "| {} | {} ({}-{}) | {} | {} | {:.3} | {:.3} | {:.2} | {:.0} | {:.2} | {:.1} |\n",
            v.name,
            pct(Some(v.exact_match)),
            pct(Some(v.exact_match_interval.0)),
            pct(Some(v.exact_match_interval.1)),
            pct(v.json_valid),
            pct(v.field_accuracy),
            v.token_f1,
            v.nll,
            v.perplexity,
            v.prompt_tokens,
            v.latency_s,
            v.tokens_per_second
        ));
    }
    if let Some(d) = &c.random_few_shot {
        s.push_str(&format!(
            "\nRandom few-shot over {} draws: median {}, range {} to {}.\n",
            d.draws,
            pct(Some(d.median)),
            pct(Some(d.min)),
            pct(Some(d.max))
        ));
    }
    for t in &c.training {
        s.push_str(&format!(
            "\nTraining ({}): {:.0} s, {} tokens.\n",
            t.adapter.display(),
            t.seconds,
            t.tokens
        ));
    }
    if !c.break_even.is_empty() {
        s.push_str("\n| prompting variant | extra prompt tokens/query | extra s/query | break-even (queries, compute) | break-even (queries, wall time) |\n|---|---|---|---|---|\n");
        for b in &c.break_even {
            let q = |x: Option<f64>| x.map_or("never".into(), |q| format!("{q:.0}"));
            s.push_str(&format!(
                "| {} | {:.0} | {:.3} | {} | {} |\n",
                b.prompting,
                b.extra_prompt_tokens,
                b.extra_seconds,
                q(b.queries_by_flops),
                q(b.queries_by_time)
            ));
        }
    }
    s.push_str(&format!("\n{}\n", c.verdict));
    s
}

/// One measure per variant, with optional 95% intervals drawn as error bars.
struct Series<'a> {
    label: &'a str,
    values: Vec<f64>,
    intervals: Option<Vec<(f64, f64)>>,
    color: plotters::style::RGBColor,
}

/// A horizontal bar chart (SVG) of one or two measures per variant.
fn bar_chart(
    title: &str,
    names: &[String],
    series: &[Series<'_>],
    x_max: f64,
    unit: &str,
) -> Result<String> {
    use plotters::prelude::*;
    let n = names.len();
    let mut svg = String::new();
    {
        let height = 90 + 44 * n as u32;
        let root = SVGBackend::with_string(&mut svg, (820, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {title}: {e}");
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(230)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                let i = y.floor() as usize;
                if (y - i as f64 - 0.5).abs() < 0.01 && i < n {
                    names[n - 1 - i].clone()
                } else {
                    String::new()
                }
            })
            .x_desc(unit)
            .draw()
            .map_err(err)?;
        let band = 0.7 / series.len() as f64;
        for (k, s) in series.iter().enumerate() {
            let color = s.color;
            let y0 = |i: usize| (n - 1 - i) as f64 + 0.15 + band * k as f64;
            chart
                .draw_series(s.values.iter().enumerate().map(|(i, &v)| {
                    Rectangle::new([(0.0, y0(i)), (v, y0(i) + band)], color.filled())
                }))
                .map_err(err)?
                .label(s.label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            for (i, &(lo, hi)) in s.intervals.iter().flatten().enumerate() {
                let (mid, cap) = (y0(i) + band / 2.0, band / 4.0);
                chart
                    .draw_series([
                        PathElement::new(vec![(lo, mid), (hi, mid)], BLACK.stroke_width(2)),
                        PathElement::new(
                            vec![(lo, mid - cap), (lo, mid + cap)],
                            BLACK.stroke_width(2),
                        ),
                        PathElement::new(
                            vec![(hi, mid - cap), (hi, mid + cap)],
                            BLACK.stroke_width(2),
                        ),
                    ])
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

const HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tuneforge: prompting vs fine-tuning</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.right { background: #e3f6e3; } td.wrong { background: #fbe0e0; }
.verdict { font-size: 17px; background: #f6f8ff; padding: 1em; border-left: 4px solid #4466cc; }
pre { white-space: pre-wrap; margin: 0; font-size: 13px; }
figure { margin: 1em 0; }
</style></head><body>
<h1>Prompting vs fine-tuning</h1>
<p>Model <b>{{ c.model }}</b>, {{ c.examples|length }} held-out examples from <code>{{ c.data }}</code>, greedy decoding.</p>
<p class="verdict" id="verdict">{{ c.verdict }}</p>
<h2>Scores</h2>
<table id="scores"><tr><th>variant</th><th>exact match (95% CI)</th><th>JSON valid</th><th>fields right</th><th>token F1</th><th>NLL</th><th>perplexity</th><th>prompt tokens</th><th>latency (s)</th><th>tokens/s</th></tr>
{% for v in rows %}<tr><td>{{ v.name }}</td><td>{{ v.em }}</td><td>{{ v.json }}</td><td>{{ v.fields }}</td><td>{{ v.f1 }}</td><td>{{ v.nll }}</td><td>{{ v.ppl }}</td><td>{{ v.prompt }}</td><td>{{ v.latency }}</td><td>{{ v.tps }}</td></tr>
{% endfor %}</table>
<figure id="accuracy-chart">{{ accuracy_svg|safe }}</figure>
<figure id="cost-chart">{{ cost_svg|safe }}</figure>
<h2>Training cost and break-even</h2>
{% for t in c.training %}<p>Training {{ t.adapter }}: {{ "%.0f"|format(t.seconds) }} s, {{ t.tokens }} tokens.</p>{% endfor %}
{% if c.break_even %}<table><tr><th>prompting variant</th><th>extra prompt tokens / query</th><th>extra seconds / query</th><th>break-even, compute (queries)</th><th>break-even, wall time (queries)</th></tr>
{% for b in c.break_even %}<tr><td>{{ b.prompting }}</td><td>{{ "%.0f"|format(b.extra_prompt_tokens) }}</td><td>{{ "%.3f"|format(b.extra_seconds) }}</td><td>{{ "%.0f"|format(b.queries_by_flops) if b.queries_by_flops is not none else "never" }}</td><td>{{ "%.0f"|format(b.queries_by_time) if b.queries_by_time is not none else "never" }}</td></tr>{% endfor %}
</table>{% else %}<p>No run folder with metrics was given, so the training cost is unknown.</p>{% endif %}
<p>Few-shot examples: {{ c.shots }}. Instruction prompt: <code>{{ c.instruction }}</code></p>
<h2>Sample outputs</h2>
<table id="samples"><tr><th>question</th><th>reference</th>{% for v in c.variants %}<th>{{ v.name }}</th>{% endfor %}</tr>
{% for e in samples %}<tr><td><pre>{{ e.question }}</pre></td><td><pre>{{ e.reference }}</pre></td>{% for o in e.outputs %}<td class="{{ 'right' if o.correct else 'wrong' }}"><pre>{{ o.answer }}</pre></td>{% endfor %}</tr>
{% endfor %}</table>
</body></html>
"#;

/// The self-contained HTML report.
pub fn html(c: &Comparison, samples: usize) -> Result<String> {
    use plotters::style::RGBColor;
    let names: Vec<String> = c.variants.iter().map(|v| v.name.clone()).collect();
    let mut accuracy = vec![Series {
        label: "exact match (95% interval)",
        values: c.variants.iter().map(|v| 100.0 * v.exact_match).collect(),
        intervals: Some(
            c.variants
                .iter()
                .map(|v| {
                    (
                        100.0 * v.exact_match_interval.0,
                        100.0 * v.exact_match_interval.1,
                    )
                })
                .collect(),
        ),
        color: RGBColor(68, 102, 204),
    }];
    if c.variants.iter().all(|v| v.field_accuracy.is_some()) {
        accuracy.push(Series {
            label: "fields right",
            values: c
                .variants
                .iter()
                .map(|v| 100.0 * v.field_accuracy.unwrap_or(0.0))
                .collect(),
            intervals: None,
            color: RGBColor(102, 187, 106),
        });
    }
    let accuracy_svg = bar_chart(
        "Accuracy per variant",
        &names,
        &accuracy,
        100.0,
        "% of held-out examples",
    )?;
    let tokens: Vec<f64> = c.variants.iter().map(|v| v.prompt_tokens).collect();
    let cost_svg = bar_chart(
        "Cost per query: prompt tokens",
        &names,
        &[Series {
            label: "prompt tokens per query",
            values: tokens.clone(),
            intervals: None,
            color: RGBColor(230, 140, 40),
        }],
        tokens.iter().cloned().fold(1.0, f64::max) * 1.1,
        "tokens per query",
    )?;
    let rows: Vec<serde_json::Value> = c.variants.iter().map(|v| serde_json::json!({
        "name": v.name, "em": format!("{} ({}-{})", pct(Some(v.exact_match)), pct(Some(v.exact_match_interval.0)), pct(Some(v.exact_match_interval.1))), "json": pct(v.json_valid), "fields": pct(v.field_accuracy),
        "f1": format!("{:.3}", v.token_f1), "nll": format!("{:.3}", v.nll), "ppl": format!("{:.2}", v.perplexity),
        "prompt": format!("{:.0}", v.prompt_tokens), "latency": format!("{:.2}", v.latency_s), "tps": format!("{:.1}", v.tokens_per_second),
    })).collect();
    let samples: Vec<serde_json::Value> = c
        .examples
        .iter()
        .enumerate()
        .take(samples)
        .map(|(i, e)| {
            serde_json::json!({
                "question": e.question(), "reference": e.reference,
                "outputs": c.variants.iter().map(|v| &v.outputs[i]).collect::<Vec<_>>(),
            })
        })
        .collect();
    use minijinja::value::Serde;
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", HTML)?;
    Ok(env
        .get_template("report.html")?
        .render(minijinja::context! {
            c => Serde(c), rows => Serde(rows), samples => Serde(samples),
            accuracy_svg => accuracy_svg, cost_svg => cost_svg,
        })?)
}

/// Writes `report.md`, `report.html` and `report.json` into `dir` (each atomically).
pub fn write(c: &Comparison, dir: &Path) -> Result<()> {
    crate::atomic::write(&dir.join("report.md"), markdown(c).as_bytes())?;
    crate::atomic::write(&dir.join("report.html"), html(c, 24)?.as_bytes())?;
    crate::atomic::write(
        &dir.join("report.json"),
        serde_json::to_string_pretty(c)?.as_bytes(),
    )
}
