//! The exports run in real llama.cpp: the fine-tuned default model merged
//! and as a LoRA adapter beside its base, every architecture, and an HF
//! model with a SentencePiece tokenizer, against tuneforge's own logits and
//! generations.

use super::*;

/// The Python that runs llama.cpp, installed on first use.
fn llama_cpp_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llama_cpp/install.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/llama_cpp/install.sh");
        assert!(out.status.success(), "installing llama.cpp failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Runs one job in llama.cpp (see `tests/llama_cpp/run.py`).
fn llama_cpp(job: Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llama_cpp/run.py");
    let mut child = Command::new(llama_cpp_python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "llama.cpp failed on {job}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// tuneforge's logits at the last position of `prompt`.
fn our_last_logits(lm: &tuneforge::CausalLm, prompt: &[u32]) -> Tensor {
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = lm.forward(&ids).unwrap().squeeze(0).unwrap();
    logits.get(prompt.len() - 1).unwrap()
}

/// llama.cpp's logits at the last position of prompt `i` of a `run.py` run.
fn their_last_logits(run: &Value, i: usize) -> Tensor {
    let logits: Vec<f32> = run["last_logits"][i]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Tensor::new(logits, &Device::Cpu).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The checks against real llama.cpp, on the default model fine-tuned
/// for 30 steps: f16 logits and greedy tokens, base + adapter against the
/// merged file, q8_0 and q4_k_m greedy answers, the chat template, and the stop
/// at end of turn.
#[test]
fn llama_cpp_runs_the_export_as_tuneforge_does() {
    tuneforge::threads::init();
    let clock = std::time::Instant::now();
    let tick = |what: &str| eprintln!("[{:.0} s] {what}", clock.elapsed().as_secs_f64());
    let base_path = match &common::smollm2().source.files {
        tuneforge::source::ModelFiles::Gguf(p) => p.clone(),
        other => panic!("the default model is not a GGUF: {other:?}"),
    };
    let mut tuned = common::smollm2_as(tuneforge::DeviceSpec::Cpu, candle_core::DType::F32);
    tuned.load_adapter(fine_tuned()).unwrap();
    tick("fine-tuned");
    let held_out = test_prompts();
    let prompts: Vec<Vec<u32>> = held_out
        .iter()
        .map(|h| tuned.chat_prompt_ids(&h.prompt).unwrap())
        .collect();

    // f16: logits and 32 greedy tokens on three chat prompts, base + adapter too.
    let f16 = exported("f16", true, Quant::F16);
    tick("exported f16");
    let three: Vec<Vec<u32>> = prompts[..3].to_vec();
    let job = |model: &Path, lora: Option<&Path>, prompts: &[Vec<u32>], n: usize| {
        json!({"model": model, "lora": lora, "prompts": prompts, "max_new_tokens": n,
               "chat": [{"role": "user", "content": held_out[0].prompt.last().unwrap().content}]})
    };
    let merged = llama_cpp(job(&f16.join("model.gguf"), None, &three, 32));
    let f16_model = load(&f16.join("model.gguf"));
    let adapted = llama_cpp(job(&base_path, Some(&f16.join("adapter.gguf")), &three, 32));
    let greedy32 = GenerationConfig {
        stop_at_eos: false,
        ..GenerationConfig::greedy(32)
    };
    for (i, prompt) in three.iter().enumerate() {
        let last = |m: &Model| our_last_logits(&m.lm, prompt);
        let theirs = their_last_logits(&merged, i);
        // tuneforge's merged model as the file holds it (f16 weights), and
        // the f32 base + adapter it was made from, whose f16 rounding adds up
        // to about 0.04 at SmolLM2's logit scale.
        let same_file = common::max_abs_diff(&last(&f16_model), &theirs);
        let from_f32 = common::max_abs_diff(&last(&tuned), &theirs);
        eprintln!(
            "f16 prompt {i}: llama.cpp's last-position logits differ by {same_file} from \
             tuneforge's on the same file, by {from_f32} from the f32 model"
        );
        assert!(
            same_file <= 0.05,
            "prompt {i}: llama.cpp's f16 logits differ by {same_file}"
        );
        assert!(
            from_f32 <= 0.1,
            "prompt {i}: the f16 file moves the logits by {from_f32}"
        );
        let ours = tuneforge::generate::generate(
            &tuned.lm,
            &tuned.tokenizer,
            prompt,
            &greedy32,
            &mut |_| {},
        )
        .unwrap()
        .ids;
        let theirs = ids_of(&merged["greedy"][i]);
        let eog = ids_of(&merged["eog"]);
        // llama.cpp stops at end of turn; tuneforge was asked not to.
        let n = theirs.len();
        assert_eq!(&ours[..n], &theirs[..], "prompt {i}: greedy tokens");
        if n < 32 {
            assert!(
                eog.contains(&ours[n]),
                "prompt {i}: llama.cpp stopped before an end-of-turn token"
            );
        }
        assert_eq!(
            ids_of(&adapted["greedy"][i]),
            theirs,
            "prompt {i}: base + adapter.gguf vs model.gguf"
        );
    }

    tick("f16 checks");
    // The chat template in the file renders tuneforge's prompt, and the end of turn stops.
    let ours = tuned
        .tokenizer
        .apply_chat_template(&held_out[0].prompt, true)
        .unwrap();
    assert_eq!(merged["rendered_chat"].as_str().unwrap(), ours);
    assert!(
        merged["stopped_at_eog"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s == true),
        "{}",
        merged["stopped_at_eog"]
    );

    // q8_0 and q4_k_m: greedy answers to every bundled test example.
    let greedy = GenerationConfig::greedy(48);
    let ours: Vec<Vec<u32>> = tuned
        .generate_batch(&prompts, &greedy, tuneforge::generate::DEFAULT_BATCH)
        .unwrap()
        .into_iter()
        .map(|g| g.ids)
        .collect();
    let text = |ids: &[u32]| {
        tuned
            .tokenizer
            .decode(ids, true)
            .unwrap()
            .trim()
            .to_string()
    };
    let accuracy = |answers: &[Vec<u32>]| {
        let right = answers
            .iter()
            .zip(&held_out)
            .filter(|(a, h)| text(a) == h.reference.trim())
            .count();
        100.0 * right as f64 / answers.len() as f64
    };
    tick("tuneforge's answers");
    eprintln!(
        "tuneforge (f32, base + adapter): test accuracy {:.0}% on {} examples",
        accuracy(&ours),
        ours.len()
    );
    for quant in [Quant::F16, Quant::Q8_0, Quant::Q4KM] {
        let dir = exported(quant.name(), true, quant);
        let theirs = llama_cpp(
            json!({"model": dir.join("model.gguf"), "prompts": prompts, "max_new_tokens": 48}),
        );
        let theirs: Vec<Vec<u32>> = (0..ours.len())
            .map(|i| ids_of(&theirs["greedy"][i]))
            .collect();
        let same = ours
            .iter()
            .zip(&theirs)
            .filter(|(o, t)| text(o) == text(t))
            .count();
        let share = same as f64 / ours.len() as f64;
        let size = std::fs::metadata(dir.join("model.gguf")).unwrap().len() as f64 / 1e6;
        eprintln!(
            "{} ({size:.0} MB): llama.cpp's greedy answers equal tuneforge's on {same} of {} \
             test examples ({:.0}%); test accuracy {:.0}%",
            quant.name(),
            ours.len(),
            100.0 * share,
            accuracy(&theirs)
        );
        tick(quant.name());
        if quant != Quant::F16 {
            assert!(share >= 0.9, "{}: {same} of {}", quant.name(), ours.len());
        }
    }
}

/// Every architecture's export runs in llama.cpp: the merged GGUF (f32) of
/// each tiny reference model with its PEFT adapter gives tuneforge's logits at
/// every position of a prompt, and base + adapter.gguf gives the same greedy
/// tokens, so the names, metadata and layout fixes are the ones llama.cpp reads.
#[test]
fn llama_cpp_runs_every_architecture() {
    tuneforge::threads::init();
    for arch in ARCHS {
        let dir = arch_fixture(arch);
        let (out, _) = export_fixture(arch);
        // The base as tuneforge writes it (the fixtures' own GGUFs, from
        // llama.cpp's converter, have no merges key, which llama.cpp requires).
        let base = out.path().join("base.gguf");
        // (Not named after the architecture: llama.cpp gives a model named
        // "phi3" the special tokens of the real Phi-3 vocabulary, which the
        // tiny one lacks.)
        tuneforge::export::write_model(&load(&dir), "base", Quant::F32, &base).unwrap();
        let prompt: Vec<u32> = (0..20).map(|i| 3 + (i * 37 + 11) % 250).collect();
        let merged = llama_cpp(json!({"model": out.path().join("model.gguf"),
            "prompts": [prompt], "max_new_tokens": 8}));
        let adapted = llama_cpp(json!({"model": base,
            "lora": out.path().join("adapter.gguf"), "prompts": [prompt], "max_new_tokens": 8}));
        let mut want = load(&dir);
        want.load_adapter(&dir.join("adapter")).unwrap();
        let diff = common::max_abs_diff(
            &our_last_logits(&want.lm, &prompt),
            &their_last_logits(&merged, 0),
        );
        eprintln!("{arch}: llama.cpp's last-position logits differ by {diff}");
        assert!(diff < 1e-2, "{arch}: llama.cpp's logits differ by {diff}");
        assert_eq!(
            merged["greedy"][0], adapted["greedy"][0],
            "{arch}: base + adapter.gguf"
        );
    }
}

/// An HF folder whose tokenizer is SentencePiece BPE (the real Phi-3
/// vocabulary, on a tiny random Phi-3; with the space prefix as Phi-3 has it
/// and without, as Gemma has it) exports a model.gguf that llama.cpp tokenizes
/// as tuneforge does (llama.cpp's own tokenizer tests, and the chat prompt with
/// its special tokens), renders the same chat prompt from, and runs with
/// tuneforge's logits.
#[test]
fn llama_cpp_runs_an_hf_model_with_a_sentencepiece_tokenizer() {
    tuneforge::threads::init();
    for add_space_prefix in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let model = common::sentencepiece_hf_model(&dir.path().join("hf"), add_space_prefix);
        let path = dir.path().join("model.gguf");
        tuneforge::export::write_model(&model, "spm", Quant::F32, &path).unwrap();
        let chat = [tuneforge::Message::user("Which team handles billing?")];
        let rendered = model.tokenizer.apply_chat_template(&chat, true).unwrap();
        let prompt = model.chat_prompt_ids(&chat).unwrap();
        let mut texts: Vec<String> = common::phi3_vocab_tests()
            .into_iter()
            .map(|(text, _)| text)
            .collect();
        texts.push(rendered.clone());
        let out = llama_cpp(
            json!({"model": path, "prompts": [prompt], "max_new_tokens": 4,
            "tokenize": texts, "chat": chat}),
        );
        for (text, theirs) in texts.iter().zip(out["tokens"].as_array().unwrap()) {
            let ours = model.tokenizer.encode(text, false).unwrap();
            assert_eq!(ids_of(theirs), ours, "prefix {add_space_prefix}: {text:?}");
        }
        assert_eq!(out["rendered_chat"], rendered.as_str());
        let diff = common::max_abs_diff(
            &our_last_logits(&model.lm, &prompt),
            &their_last_logits(&out, 0),
        );
        eprintln!("prefix {add_space_prefix}: llama.cpp's last-position logits differ by {diff}");
        assert!(diff < 1e-2, "llama.cpp's logits differ by {diff}");
    }
}
