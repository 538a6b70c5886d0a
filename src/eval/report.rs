//! The comparison's reports: a Markdown table (terminal and `report.md`), a
//! self-contained `report.html` with charts and side-by-side answers, and
//! `report.json` for machines.

use super::charts::{bar_chart, line_chart, Line, Series};
use super::comparison::Comparison;
use super::overlap::split_exact_match;
use super::significance::probability;
use anyhow::Result;
use plotters::style::RGBColor;
use std::path::Path;

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
}

/// The scores and costs as Markdown tables, with the notes, the scaling
/// curve and the verdict.
pub fn markdown(c: &Comparison) -> String {
    let mut s = String::from("| variant | exact match (95% CI) | JSON valid | fields right | fields right, valid only | token F1 | NLL | perplexity | prompt tokens | latency (s) | tokens/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for v in &c.variants {
        s.push_str(&format!(
            "| {} | {} ({}-{}) | {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.0} | {:.2} | {:.1} |\n",
            v.name,
            pct(Some(v.exact_match)),
            pct(Some(v.exact_match_interval.0)),
            pct(Some(v.exact_match_interval.1)),
            pct(v.json_valid),
            pct(v.field_accuracy),
            pct(v.field_accuracy_valid),
            v.token_f1,
            v.nll,
            v.perplexity,
            v.prompt_tokens,
            v.latency_s,
            v.tokens_per_second
        ));
    }
    for v in c.variants.iter().filter(|v| v.note.is_some()) {
        s.push_str(&format!(
            "\n{}: {}.\n",
            v.name,
            v.note.as_deref().unwrap_or_default()
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
    if let Some(m) = &c.majority_answer {
        s.push_str(&format!(
            "\nAlways the most common training answer ({} of {}: `{}`): {} exact match ({}-{}).\n",
            m.count,
            m.of,
            m.answer,
            pct(Some(m.exact_match)),
            pct(Some(m.interval.0)),
            pct(Some(m.interval.1))
        ));
    }
    s.push_str(&format!(
        "\nInstruction: {}\n",
        c.instruction.replace('\n', " ")
    ));
    s.push_str("\nCost per query, with the shared-prefix cache and without it (each query prefilling its whole prompt):\n\n| variant | prefill tokens | prefill tokens, no cache | prefill (s) | prefill, no cache (s) | decode tokens | decode (s) |\n|---|---|---|---|---|---|---|\n");
    for v in &c.variants {
        let q = &v.cost;
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.1} | {:.3} |\n",
            v.name,
            q.prefill_tokens,
            q.prefill_tokens_uncached,
            q.prefill_s,
            q.prefill_s_uncached,
            q.decode_tokens,
            q.decode_s
        ));
    }
    for t in &c.training {
        s.push_str(&format!(
            "\nTraining ({}): {:.0} s, {} tokens{}.\n",
            t.adapter.display(),
            t.seconds,
            t.tokens,
            if t.recompute { ", with recompute" } else { "" }
        ));
    }
    if !c.break_even.is_empty() {
        s.push_str("\n| prompting variant | extra prompt tokens/query | extra answer tokens/query | extra s/query | break-even (queries, compute) | break-even (queries, wall time) | break-even (wall time, no prefix cache) |\n|---|---|---|---|---|---|---|\n");
        for b in &c.break_even {
            let q = |x: Option<f64>| x.map_or("never".into(), |q| format!("{q:.0}"));
            s.push_str(&format!(
                "| {} | {:.0} | {:.1} | {:.3} | {} | {} | {} |\n",
                b.prompting,
                b.extra_prompt_tokens,
                // Not "-0.0" for a difference that rounds to nothing.
                if b.extra_answer_tokens.abs() < 0.05 {
                    0.0
                } else {
                    b.extra_answer_tokens
                },
                b.extra_seconds,
                q(b.queries_by_flops),
                q(b.queries_by_time),
                q(b.queries_by_time_uncached)
            ));
        }
    }
    if let Some(sc) = &c.scaling {
        s.push_str(&format!("\nData scaling (retrieved few-shot with k={}):\n\n| n | fine-tuned (95% CI) | retrieved few-shot (95% CI) | difference (paired 95% CI) | McNemar p | run folder |\n|---|---|---|---|---|---|\n", sc.shots));
        for p in &sc.points {
            let acc = |a: &super::scaling::Accuracy| {
                format!(
                    "{} ({}-{})",
                    pct(Some(a.exact_match)),
                    pct(Some(a.interval.0)),
                    pct(Some(a.interval.1))
                )
            };
            let d = &p.paired;
            s.push_str(&format!(
                "| {} | {} | {} | {:+.1} ({:+.1} to {:+.1}) | {} | {}{} |\n",
                p.n,
                acc(&p.fine_tuned),
                acc(&p.retrieved),
                100.0 * d.difference,
                100.0 * d.interval.0,
                100.0 * d.interval.1,
                probability(d.p_value),
                p.run.display(),
                if p.reused { " (reused)" } else { "" }
            ));
        }
    }
    let near = near_duplicate_rows(c);
    if !near.is_empty() {
        let n = c.near_duplicates.len();
        s.push_str(&format!(
            "\nNear-duplicates: {n} of the {} held-out questions have a training question at \
             word-level ROUGE-L {} or more. Exact match on them and on the others:\n\n\
             | variant | near-duplicates ({n}) | the others ({}) |\n|---|---|---|\n",
            c.examples.len(),
            c.near_duplicate_threshold,
            c.examples.len() - n,
        ));
        for r in &near {
            let cell = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                cell("name"),
                cell("near"),
                cell("others")
            ));
        }
    }
    for note in &c.notes {
        s.push_str(&format!("\nNote: {note}.\n"));
    }
    s.push_str(&format!("\n{}\n", c.verdict));
    s
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
<table id="scores"><tr><th>variant</th><th>exact match (95% CI)</th><th>JSON valid</th><th>fields right</th><th>fields right, valid only</th><th>token F1</th><th>NLL</th><th>perplexity</th><th>prompt tokens</th><th>latency (s)</th><th>tokens/s</th></tr>
{% for v in rows %}<tr><td>{{ v.name }}</td><td>{{ v.em }}</td><td>{{ v.json }}</td><td>{{ v.fields }}</td><td>{{ v.fields_valid }}</td><td>{{ v.f1 }}</td><td>{{ v.nll }}</td><td>{{ v.ppl }}</td><td>{{ v.prompt }}</td><td>{{ v.latency }}</td><td>{{ v.tps }}</td></tr>
{% endfor %}</table>
<ul id="variant-notes">{% for v in c.variants %}{% if v.note %}<li><b>{{ v.name }}</b>: {{ v.note }}.</li>{% endif %}{% endfor %}
{% if c.random_few_shot %}<li>Random few-shot over {{ c.random_few_shot.draws }} draws: median {{ "%.1f"|format(100 * c.random_few_shot.median) }}%, range {{ "%.1f"|format(100 * c.random_few_shot.min) }}% to {{ "%.1f"|format(100 * c.random_few_shot.max) }}%.</li>{% endif %}
{% if c.majority_answer %}<li id="majority-answer">Always the most common training answer ({{ c.majority_answer.count }} of {{ c.majority_answer.of }}: <code>{{ c.majority_answer.answer }}</code>): {{ "%.1f"|format(100 * c.majority_answer.exact_match) }}% exact match ({{ "%.1f"|format(100 * c.majority_answer.interval[0]) }}-{{ "%.1f"|format(100 * c.majority_answer.interval[1]) }}%).</li>{% endif %}
<li>Instruction prompt: <code>{{ c.instruction }}</code></li></ul>
<figure id="accuracy-chart">{{ accuracy_svg|safe }}</figure>
<h2>Cost per query</h2>
<p>With the shared-prefix cache, the prompt prefix every query of a variant shares is prefilled once and its cost split among the queries; without it, each query prefills its whole prompt.</p>
<table id="costs"><tr><th>variant</th><th>prefill tokens</th><th>prefill tokens, no cache</th><th>prefill (s)</th><th>prefill, no cache (s)</th><th>decode tokens</th><th>decode (s)</th></tr>
{% for v in c.variants %}<tr><td>{{ v.name }}</td><td>{{ "%.0f"|format(v.cost.prefill_tokens) }}</td><td>{{ "%.0f"|format(v.cost.prefill_tokens_uncached) }}</td><td>{{ "%.3f"|format(v.cost.prefill_s) }}</td><td>{{ "%.3f"|format(v.cost.prefill_s_uncached) }}</td><td>{{ "%.1f"|format(v.cost.decode_tokens) }}</td><td>{{ "%.3f"|format(v.cost.decode_s) }}</td></tr>
{% endfor %}</table>
<figure id="cost-chart">{{ cost_svg|safe }}</figure>
<h2>Training cost and break-even</h2>
{% for t in c.training %}<p>Training {{ t.adapter }}: {{ "%.0f"|format(t.seconds) }} s, {{ t.tokens }} tokens{% if t.recompute %}, with recompute{% endif %}.</p>{% endfor %}
{% if c.break_even %}<table id="break-even"><tr><th>prompting variant</th><th>extra prompt tokens / query</th><th>extra answer tokens / query</th><th>extra seconds / query</th><th>break-even, compute (queries)</th><th>break-even, wall time (queries)</th><th>break-even, wall time, no prefix cache (queries)</th></tr>
{% for b in c.break_even %}<tr><td>{{ b.prompting }}</td><td>{{ "%.0f"|format(b.extra_prompt_tokens) }}</td><td>{{ "%.1f"|format(b.extra_answer_tokens) if b.extra_answer_tokens|abs >= 0.05 else "0.0" }}</td><td>{{ "%.3f"|format(b.extra_seconds) }}</td><td>{{ "%.0f"|format(b.queries_by_flops) if b.queries_by_flops is not none else "never" }}</td><td>{{ "%.0f"|format(b.queries_by_time) if b.queries_by_time is not none else "never" }}</td><td>{{ "%.0f"|format(b.queries_by_time_uncached) if b.queries_by_time_uncached is not none else "never" }}</td></tr>{% endfor %}
</table>
<figure id="break-even-chart">{{ break_even_svg|safe }}</figure>{% else %}<p>No run folder with metrics was given, so the training cost is unknown.</p>{% endif %}
{% if c.scaling %}<h2>How much data does fine-tuning need?</h2>
<table id="scaling"><tr><th>training examples</th><th>fine-tuned (95% CI)</th><th>retrieved few-shot, k={{ c.scaling.shots }} (95% CI)</th><th>difference (paired 95% CI)</th><th>McNemar p</th><th>run folder</th></tr>
{% for p in c.scaling.points %}<tr><td>{{ p.n }}</td><td>{{ "%.1f"|format(100 * p.fine_tuned.exact_match) }}% ({{ "%.1f"|format(100 * p.fine_tuned.interval[0]) }}-{{ "%.1f"|format(100 * p.fine_tuned.interval[1]) }}%)</td><td>{{ "%.1f"|format(100 * p.retrieved.exact_match) }}% ({{ "%.1f"|format(100 * p.retrieved.interval[0]) }}-{{ "%.1f"|format(100 * p.retrieved.interval[1]) }}%)</td><td>{{ "%+.1f"|format(100 * p.paired.difference) }} ({{ "%+.1f"|format(100 * p.paired.interval[0]) }} to {{ "%+.1f"|format(100 * p.paired.interval[1]) }})</td><td>{{ p.paired.p_value|probability }}</td><td><code>{{ p.run }}</code>{{ " (reused)" if p.reused else "" }}</td></tr>{% endfor %}
</table>
<p>{{ scaling_summary }}</p>
<figure id="scaling-chart">{{ scaling_svg|safe }}</figure>{% endif %}
{% if near_rows %}<h2>Near-duplicates of training questions</h2>
<p>{{ c.near_duplicates|length }} of the {{ c.examples|length }} held-out questions have a training question at word-level ROUGE-L {{ c.near_duplicate_threshold }} or more (the pairs are in <code>report.json</code>). Exact match on them and on the others:</p>
<table id="near-duplicates"><tr><th>variant</th><th>near-duplicates ({{ c.near_duplicates|length }})</th><th>the others ({{ c.examples|length - c.near_duplicates|length }})</th></tr>
{% for r in near_rows %}<tr><td>{{ r.name }}</td><td>{{ r.near }}</td><td>{{ r.others }}</td></tr>{% endfor %}
</table>{% endif %}
{% if c.notes %}<h2>Notes</h2><ul id="notes">{% for n in c.notes %}<li>{{ n }}.</li>{% endfor %}</ul>{% endif %}
<h2>Sample outputs</h2>
<table id="samples"><tr><th>question</th><th>reference</th>{% for v in c.variants %}<th>{{ v.name }}</th>{% endfor %}</tr>
{% for e in samples %}<tr><td><pre>{{ e.question }}</pre></td><td><pre>{{ e.reference }}</pre></td>{% for o in e.outputs %}<td class="{{ 'right' if o.correct else 'wrong' }}"><pre>{{ o.answer }}</pre></td>{% endfor %}</tr>
{% endfor %}</table>
</body></html>
"#;

/// Each variant's exact match on the near-duplicates and on the other
/// questions, for both reports (none when there are no near-duplicates).
fn near_duplicate_rows(c: &Comparison) -> Vec<serde_json::Value> {
    if c.near_duplicates.is_empty() {
        return Vec::new();
    }
    c.variants
        .iter()
        .map(|v| {
            let (near, rest) = split_exact_match(v, &c.near_duplicates);
            serde_json::json!({"name": v.name, "near": pct(near), "others": pct(rest)})
        })
        .collect()
}

/// Line colors, in turn.
const PALETTE: [RGBColor; 8] = [
    RGBColor(68, 102, 204),
    RGBColor(230, 140, 40),
    RGBColor(102, 187, 106),
    RGBColor(200, 60, 60),
    RGBColor(140, 90, 180),
    RGBColor(60, 170, 190),
    RGBColor(150, 110, 70),
    RGBColor(120, 120, 120),
];

/// Cumulative seconds against query volume: the fine-tune (training, then
/// its per-query time) against each prompting variant, on log axes.
fn break_even_chart(c: &Comparison) -> Result<Option<String>> {
    let Some(first) = c.break_even.first() else {
        return Ok(None);
    };
    let by_name = |name: &str| c.variants.iter().find(|v| v.name == name);
    let (Some(ft), Some(cost)) = (
        by_name(&first.fine_tuned),
        c.training.iter().find(|t| {
            by_name(&first.fine_tuned).and_then(|v| v.adapter.as_ref()) == Some(&t.adapter)
        }),
    ) else {
        return Ok(None);
    };
    let furthest = c
        .break_even
        .iter()
        .filter(|b| b.fine_tuned == first.fine_tuned)
        .filter_map(|b| b.queries_by_time)
        .fold(1e3, f64::max);
    let top = 10f64.powf((furthest * 10.0).log10().ceil()).min(1e9);
    let steps = (top.log10() * 4.0) as usize;
    let xs: Vec<f64> = (0..=steps).map(|i| 10f64.powf(i as f64 / 4.0)).collect();
    let mut lines = vec![Line {
        label: ft.name.as_str(),
        values: xs.iter().map(|q| cost.seconds + ft.latency_s * q).collect(),
        intervals: None,
        color: PALETTE[0],
    }];
    for (i, b) in c
        .break_even
        .iter()
        .filter(|b| b.fine_tuned == first.fine_tuned)
        .enumerate()
    {
        if let Some(p) = by_name(&b.prompting) {
            lines.push(Line {
                label: p.name.as_str(),
                values: xs.iter().map(|q| p.latency_s * q).collect(),
                intervals: None,
                color: PALETTE[1 + i % (PALETTE.len() - 1)],
            });
        }
    }
    Ok(Some(line_chart(
        "Break-even: total seconds against queries served",
        &xs,
        &lines,
        ("queries", "seconds (training + queries)"),
        (true, true),
    )?))
}

/// Exact match against the training-set size, fine-tuned and retrieved
/// few-shot, with 95% intervals.
fn scaling_chart(c: &Comparison) -> Result<Option<String>> {
    let Some(sc) = c.scaling.as_ref().filter(|s| !s.points.is_empty()) else {
        return Ok(None);
    };
    let xs: Vec<f64> = sc.points.iter().map(|p| p.n as f64).collect();
    let pcts = |f: fn(&super::scaling::ScalingPoint) -> &super::scaling::Accuracy| {
        let values = sc.points.iter().map(|p| 100.0 * f(p).exact_match).collect();
        let intervals = sc
            .points
            .iter()
            .map(|p| (100.0 * f(p).interval.0, 100.0 * f(p).interval.1))
            .collect();
        (values, Some(intervals))
    };
    let (ft, ft_ci) = pcts(|p| &p.fine_tuned);
    let (rt, rt_ci) = pcts(|p| &p.retrieved);
    let lines = [
        Line {
            label: "fine-tuned on n",
            values: ft,
            intervals: ft_ci,
            color: PALETTE[0],
        },
        Line {
            label: "retrieved few-shot from n",
            values: rt,
            intervals: rt_ci,
            color: PALETTE[1],
        },
    ];
    Ok(Some(line_chart(
        "Exact match against training examples",
        &xs,
        &lines,
        ("training examples (n)", "% exact match"),
        (xs.len() > 1 && xs[0] > 0.0, false),
    )?))
}

/// The self-contained HTML report.
pub fn html(c: &Comparison, samples: usize) -> Result<String> {
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
        "fields_valid": pct(v.field_accuracy_valid),
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
    env.add_filter("probability", probability);
    env.add_template("report.html", HTML)?;
    Ok(env
        .get_template("report.html")?
        .render(minijinja::context! {
            c => Serde(c), rows => Serde(rows), samples => Serde(samples),
            near_rows => Serde(near_duplicate_rows(c)),
            accuracy_svg => accuracy_svg, cost_svg => cost_svg,
            break_even_svg => break_even_chart(c)?.unwrap_or_default(),
            scaling_svg => scaling_chart(c)?.unwrap_or_default(),
            scaling_summary => c.scaling.as_ref().map(|s| s.summary()),
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
