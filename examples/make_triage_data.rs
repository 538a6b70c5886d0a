//! Writes the bundled example dataset, `examples/data/{train,valid,test}.jsonl`:
//! customer support messages triaged into a fixed JSON object,
//! `{"category": ..., "priority": ...}`. Deterministic: the same seed writes the
//! same bytes.
//!
//! ```text
//! cargo run --release --example make_triage_data
//! cargo run --release --example make_triage_data -- --out elsewhere/
//! ```

use anyhow::{Context, Result};
use tuneforge::rng::Rng;

const CATEGORIES: [(&str, &[&str]); 5] = [
    (
        "billing",
        &[
            "I was charged twice for my {plan} subscription this month.",
            "My invoice for {month} shows the wrong amount.",
            "Please refund the {amount} I paid for the {plan} plan.",
            "Why was my card billed again after I cancelled?",
            "The discount code I used was not applied to my {month} bill.",
            "I was billed {amount} but my plan should cost less.",
        ],
    ),
    (
        "technical",
        &[
            "The {app} app crashes every time I open the {screen} screen.",
            "I get error {code} when I try to sync my files.",
            "The dashboard stays blank after I log in with {browser}.",
            "Uploads fail with a timeout since the last update.",
            "Notifications stopped working on my {device}.",
            "The {screen} page takes minutes to load and then shows error {code}.",
        ],
    ),
    (
        "account",
        &[
            "I can't reset my password because the email never arrives.",
            "Please change the email address on my account to {email}.",
            "My account was locked after too many login attempts.",
            "How do I delete my account and all of my data?",
            "I want to add a second admin, {name}, to our team account.",
            "Two-factor codes from my {device} are rejected at login.",
        ],
    ),
    (
        "shipping",
        &[
            "My order {order} has not arrived and it has been {days} days.",
            "The package was delivered to the wrong address.",
            "Tracking for order {order} has not updated since {weekday}.",
            "The box arrived damaged and the {item} inside is broken.",
            "I received a {item} instead of what I ordered in {order}.",
            "Can you ship order {order} to my office instead of my home?",
        ],
    ),
    (
        "feature_request",
        &[
            "It would be great if the {app} app had a dark mode.",
            "Could you support exporting reports to {format}?",
            "Please add keyboard shortcuts for {action}.",
            "I would love an option to schedule {thing} in advance.",
            "Could the {screen} screen show totals per week?",
            "Please let us tag invoices with our own project codes.",
        ],
    ),
];

const PRIORITIES: [(&str, &[&str]); 3] = [
    (
        "high",
        &[
            "This is urgent: we are losing customers every hour.",
            "Please fix this ASAP, our whole team is blocked.",
            "I need this resolved today, it is critical.",
            "Our launch is tomorrow and this is a blocker.",
        ],
    ),
    (
        "medium",
        &[
            "Could you look into it this week?",
            "It is annoying, but I can work around it for now.",
            "Please get back to me in the next few days.",
            "It would help to have this sorted soon.",
        ],
    ),
    (
        "low",
        &[
            "No rush, whenever you get a chance.",
            "Just letting you know, it is not urgent at all.",
            "Low priority, only a suggestion.",
            "Take your time with this one.",
        ],
    ),
];

const OPENERS: [&str; 6] = [
    "Hi,",
    "Hello team,",
    "Hey there.",
    "Good morning,",
    "",
    "Dear support,",
];
const CLOSERS: [&str; 5] = [
    "Thanks!",
    "Best regards, {name}",
    "Cheers",
    "",
    "Thank you for your help.",
];

fn pick<'a>(rng: &mut Rng, options: &[&'a str]) -> &'a str {
    options[rng.below(options.len())]
}

fn fill(template: &str, rng: &mut Rng) -> String {
    let slots: [(&str, &[&str]); 17] = [
        ("{plan}", &["Pro", "Team", "Basic", "Enterprise"]),
        ("{month}", &["March", "April", "June", "October"]),
        ("{amount}", &["$49", "$120", "$9.99", "$300"]),
        ("{app}", &["mobile", "desktop", "iPad", "Android"]),
        ("{screen}", &["settings", "reports", "billing", "calendar"]),
        ("{code}", &["E401", "503", "SYNC-17", "0x80070005"]),
        ("{browser}", &["Firefox", "Chrome", "Safari", "Edge"]),
        ("{device}", &["iPhone", "Pixel phone", "laptop", "tablet"]),
        (
            "{email}",
            &["sam@example.com", "ops@example.org", "lee@example.net"],
        ),
        ("{name}", &["Sam", "Priya", "Lee", "Jordan", "Ana"]),
        ("{order}", &["#10492", "#88310", "#55021", "#70007"]),
        ("{days}", &["5", "9", "12", "20"]),
        ("{weekday}", &["Monday", "Tuesday", "Friday"]),
        ("{item}", &["lamp", "keyboard", "mug", "charger"]),
        ("{format}", &["CSV", "Excel", "PDF"]),
        ("{action}", &["archiving", "search", "switching projects"]),
        ("{thing}", &["reports", "emails", "backups"]),
    ];
    let mut out = template.to_string();
    for (slot, values) in slots {
        while out.contains(slot) {
            out = out.replacen(slot, pick(rng, values), 1);
        }
    }
    out
}

fn example(rng: &mut Rng) -> serde_json::Value {
    let (category, issues) = CATEGORIES[rng.below(CATEGORIES.len())];
    let (priority, urgency) = PRIORITIES[rng.below(PRIORITIES.len())];
    let parts = [
        pick(rng, &OPENERS),
        pick(rng, issues),
        pick(rng, urgency),
        pick(rng, &CLOSERS),
    ];
    let message: Vec<String> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| fill(p, rng))
        .collect();
    let answer = format!("{{\"category\": \"{category}\", \"priority\": \"{priority}\"}}");
    serde_json::json!({"prompt": message.join(" "), "completion": answer})
}

#[derive(clap::Parser)]
#[command(about = "Write the bundled triage dataset")]
struct Args {
    /// Where to write train.jsonl, valid.jsonl and test.jsonl (default: the bundled examples/data).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let dir = args
        .out
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = Rng::new(20261124);
    // No message twice, within a split or across them: a test question that
    // is also a training one would measure recall (`compare` flags it).
    let mut seen = std::collections::HashSet::new();
    for (name, count) in [("train", 400), ("valid", 48), ("test", 48)] {
        let mut text = String::new();
        let mut written = 0;
        while written < count {
            let record = example(&mut rng);
            if seen.insert(record["prompt"].to_string()) {
                text.push_str(&record.to_string());
                text.push('\n');
                written += 1;
            }
        }
        tuneforge::atomic::write(&dir.join(format!("{name}.jsonl")), text.as_bytes())?;
        println!(
            "wrote {count} examples to {}",
            dir.join(format!("{name}.jsonl")).display()
        );
    }
    Ok(())
}
