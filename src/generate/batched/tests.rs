use super::*;
use crate::config::Architecture;
use crate::testing::tiny_with_window;

/// Batched answers equal one-at-a-time answers for every architecture
/// (sliding windows shorter than the prompts included), at every batch
/// size, with a shared prefix and rows that end at different steps.
#[test]
fn batched_greedy_answers_equal_one_at_a_time() {
    for arch in Architecture::ALL {
        // A short context, so that longer prompts get fewer new tokens
        // and rows leave the batch at different steps.
        let model = tiny_with_window(arch, 5, Some(20));
        let prefix: Vec<u32> = vec![3, 17, 40, 8, 99];
        let shared: Vec<Vec<u32>> = [vec![5u32], vec![6, 7, 8], vec![60, 61], vec![]]
            .into_iter()
            .map(|own| prefix.iter().copied().chain(own).collect())
            .collect();
        let mut unshared = shared.clone();
        unshared.push(vec![200, 201, 202]);
        for (prompts, stop_at_eos, max_new_tokens) in [
            (&shared, false, 9),
            (&shared, true, 30),
            (&unshared, false, 30),
        ] {
            let config = GenerationConfig {
                max_new_tokens,
                stop_at_eos,
                ..GenerationConfig::greedy(0)
            };
            // One at a time: the old path, `generate` per prompt.
            let alone: Vec<Vec<u32>> = model
                .generate_batch(prompts, &config, 1)
                .unwrap()
                .into_iter()
                .map(|g| g.ids)
                .collect();
            for batch in [1, 2, 5] {
                let together: Vec<Vec<u32>> =
                    generate_batch(&model.lm, &model.tokenizer, prompts, &config, batch)
                        .unwrap()
                        .into_iter()
                        .map(|g| g.ids)
                        .collect();
                assert_eq!(together, alone, "{arch:?}, batch {batch}");
            }
        }
    }
}

/// Answers constrained to JSON fit the schema, ended or not, and batched
/// constrained answers equal one-at-a-time ones, greedy and sampled.
#[test]
fn constrained_answers_fit_the_schema() {
    use crate::generate::json::{JsonMatcher, JsonSchema};
    let enums = JsonSchema::from_answers(&[
        r#"{"category": "billing", "priority": "low"}"#,
        r#"{"category": "account", "priority": "high", "n": 12}"#,
    ])
    .unwrap();
    let free = JsonSchema::from_answers(&[r#"{"note": [1, {"a": "x"}], "ok": true}"#]).unwrap();
    let model = tiny_with_window(Architecture::Llama, 3, Some(400));
    let prompts: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![5, 6, 9, 10], vec![40]];
    for (schema, must_end) in [(enums, true), (free, false)] {
        for temperature in [0.0, 1.0] {
            let config = GenerationConfig {
                max_new_tokens: 150,
                temperature,
                json_schema: Some(std::sync::Arc::new(schema.clone())),
                ..GenerationConfig::default()
            };
            let alone = model.generate_batch(&prompts, &config, 1).unwrap();
            let together =
                generate_batch(&model.lm, &model.tokenizer, &prompts, &config, 3).unwrap();
            for (a, b) in alone.iter().zip(&together) {
                assert_eq!(a.ids, b.ids, "temperature {temperature}");
                let mut m = JsonMatcher::new(&schema);
                assert!(m.feed(a.text.as_bytes()), "{}", a.text);
                if must_end {
                    assert!(a.stopped_at_eos && m.is_done(), "{}", a.text);
                    serde_json::from_str::<serde_json::Value>(&a.text).unwrap();
                }
            }
        }
    }
}

/// Decoding and scoring in one prefill: the answers of decoding alone
/// and the scores of scoring alone, for every architecture, with a
/// reference that does not continue its prompt (scored apart) and one with
/// nothing trained.
#[test]
fn one_prefill_decodes_and_scores() {
    use crate::generate::{summed_nll_after, SharedPrefix};
    for arch in Architecture::ALL {
        let model = tiny_with_window(arch, 7, Some(40));
        let (lm, tokenizer) = (&model.lm, &model.tokenizer);
        let prefix: Vec<u32> = vec![3, 17, 40, 8];
        let prompts: Vec<Vec<u32>> = [vec![5u32], vec![6, 7, 8, 9], vec![60, 61], vec![70]]
            .into_iter()
            .map(|own| prefix.iter().copied().chain(own).collect())
            .collect();
        let reference = |prompt: &[u32], answer: &[u32], trained: bool| {
            let ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
            let trained = (0..ids.len())
                .map(|i| trained && i >= prompt.len())
                .collect();
            Example { ids, trained }
        };
        let references = vec![
            reference(&prompts[0], &[11, 12, 13, 2], true),
            reference(&prompts[1], &[14], true),
            // Not a continuation of its prompt: scored on its own.
            reference(&[3, 17, 40, 8, 99], &[15, 16], true),
            reference(&prompts[3], &[21, 22], false),
        ];
        let config = GenerationConfig {
            stop_at_eos: false,
            ..GenerationConfig::greedy(7)
        };
        let sequences: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let shared = SharedPrefix::of(lm, &sequences).unwrap();
        let alone = generate_batch_after(lm, tokenizer, &shared, &prompts, &config, 4).unwrap();
        let scored = summed_nll_after(lm, 0, &shared, &references, 4).unwrap();
        for batch in [1, 3, 4] {
            let (answers, scores) = generate_and_score_after(
                lm,
                tokenizer,
                &shared,
                &prompts,
                Some(&references),
                &config,
                batch,
            )
            .unwrap();
            for (a, b) in answers.iter().zip(&alone) {
                assert_eq!(a.ids, b.ids, "{arch:?}, batch {batch}");
            }
            assert_eq!(scores[3], (0.0, 0), "{arch:?}");
            for ((sum, n), (want, m)) in scores.iter().zip(&scored) {
                assert_eq!(n, m, "{arch:?}, batch {batch}");
                assert!((sum - want).abs() < 1e-4, "{arch:?}: {sum} vs {want}");
            }
        }
    }
}

#[test]
fn empty_and_overlong_prompts_are_refused() {
    let model = crate::Model::tiny_random(Architecture::Llama, 0).unwrap();
    let config = GenerationConfig::greedy(4);
    let err =
        generate_batch(&model.lm, &model.tokenizer, &[vec![1], vec![]], &config, 4).unwrap_err();
    assert!(err.to_string().contains("prompt 1 is empty"), "{err}");
    let long = vec![1; model.config().max_position_embeddings];
    let err = generate_batch(&model.lm, &model.tokenizer, &[long], &config, 4).unwrap_err();
    assert!(err.to_string().contains("context window"), "{err}");
}
