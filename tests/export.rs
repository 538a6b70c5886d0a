//! GGUF export, checked against tuneforge itself for every architecture and
//! against real llama.cpp on the default model fine-tuned on the bundled data.
//!
//! llama.cpp comes from `llama-cpp-python` on PyPI, built from source once per
//! machine by `tests/llama_cpp/install.sh` (about 10 minutes, cached outside
//! the clone); `tests/llama_cpp/run.py` runs a GGUF in it.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use tuneforge::eval::HeldOut;
use tuneforge::export::{export, ExportOptions, Quant};
use tuneforge::finetune::{run, Existing, JobConfig};
use tuneforge::model::FrozenWeight;
use tuneforge::quantize::format_name;
use tuneforge::{GenerationConfig, LoadOptions, Model, Quantize};

fn arch_fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/archs")
        .join(arch)
}

fn load(path: &Path) -> Model {
    Model::load(path.to_str().unwrap(), &LoadOptions::f32_base())
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

/// The architectures with tiny reference models.
const ARCHS: [&str; 5] = ["qwen3", "smollm3", "gemma3", "gemma2", "phi3"];

/// Exports a reference model with its PEFT adapter, merged in f32, into a
/// fresh temporary folder.
fn export_fixture(arch: &str) -> (tempfile::TempDir, tuneforge::export::ExportReport) {
    let dir = arch_fixture(arch);
    let out = tempfile::tempdir().unwrap();
    let options = ExportOptions {
        merge: true,
        quant: Quant::F32,
        overwrite: false,
    };
    let report = export(load(&dir), &dir.join("adapter"), out.path(), &options)
        .unwrap_or_else(|e| panic!("{arch}: {e:#}"));
    (out, report)
}

fn gguf(path: &Path) -> gguf_file::Content {
    let mut file = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut file).unwrap()
}

/// Every architecture exports: its merged GGUF (f32, under llama.cpp's names
/// and metadata keys) loads back into tuneforge with the logits of the base
/// with the PEFT adapter, and its adapter GGUF holds every adapted linear.
#[test]
fn every_architecture_exports_and_loads_back() {
    tuneforge::threads::init();
    for arch in ARCHS {
        let dir = arch_fixture(arch);
        let (out, report) = export_fixture(arch);
        let mut want = load(&dir);
        want.load_adapter(&dir.join("adapter")).unwrap();
        let ids = Tensor::new(&[[1u32, 80, 81, 82, 2, 90, 91]], &Device::Cpu).unwrap();
        let got = load(&out.path().join("model.gguf"));
        let diff = common::max_abs_diff(
            &got.lm.forward(&ids).unwrap(),
            &want.lm.forward(&ids).unwrap(),
        );
        assert!(diff < 1e-4, "{arch}: merged GGUF logits off by {diff}");
        // GGUF keeps floats as f32.
        let eps = (got.lm.config.rms_norm_eps, want.lm.config.rms_norm_eps);
        assert!((eps.0 - eps.1).abs() < 1e-6 * eps.1, "{arch}: {eps:?}");
        let got_config = tuneforge::ModelConfig {
            rms_norm_eps: eps.1,
            ..got.lm.config.clone()
        };
        assert_eq!(got_config, want.lm.config, "{arch}");
        let adapter = gguf(&report.adapter);
        let linears = want.lm.layers.len() * want.lm.layers[0].linears().len();
        assert_eq!(report.adapted_linears, linears, "{arch}");
        assert_eq!(adapter.tensor_infos.len(), 2 * linears, "{arch}");
        assert_eq!(
            adapter.metadata["general.architecture"]
                .to_string()
                .unwrap(),
            &gguf(&out.path().join("model.gguf")).metadata["general.architecture"]
                .to_string()
                .unwrap()
                .clone()
        );
    }
}

/// The merged GGUF trains again: a few steps from it lower the loss.
#[test]
fn the_merged_gguf_trains_again() {
    tuneforge::threads::init();
    let dir = arch_fixture("qwen3");
    let out = tempfile::tempdir().unwrap();
    let options = ExportOptions {
        merge: true,
        quant: Quant::F16,
        overwrite: false,
    };
    export(load(&dir), &dir.join("adapter"), out.path(), &options).unwrap();
    let data = out.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"q{i}\", \"completion\": \"answer {i}\"}}\n"))
        .collect();
    std::fs::write(data.join("train.jsonl"), lines).unwrap();
    let job = JobConfig {
        model: out.path().join("model.gguf").display().to_string(),
        data,
        out: out.path().join("run"),
        device: "cpu".into(),
        samples: 0,
        train: tuneforge::train::TrainConfig {
            learning_rate: 1e-2,
            max_steps: Some(6),
            batch_size: 4,
            eval_every: None,
            save_every: None,
            ..Default::default()
        },
        ..JobConfig::default()
    };
    run(&job, Existing::Refuse, None).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(job.out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| match serde_json::from_str(l).unwrap() {
            tuneforge::train::Event::Step { loss, .. } => Some(loss),
            _ => None,
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
}

/// A K-quant export (q4_k_m: Q4_K and Q6_K, and Q5_0 and Q8_0 where
/// SmolLM2's 576-value rows are not whole 256-value blocks, as llama.cpp
/// falls back) loads with `--quantize keep` in its own blocks: its exact
/// products give the logits of the same file loaded dense, and the int8
/// kernel (where the CPU has it) stays within its rounding of them.
#[test]
fn a_k_quant_export_is_kept_in_its_blocks() {
    tuneforge::threads::init();
    let path = exported("q4_k_m-kept", true, Quant::Q4KM).join("model.gguf");
    let load_as = |quantize| {
        let options = LoadOptions {
            quantize,
            ..LoadOptions::f32_base()
        };
        Model::load(path.to_str().unwrap(), &options).unwrap()
    };
    let (mut kept, dense) = (load_as(Quantize::Keep), load_as(Quantize::None));
    let mut formats: Vec<String> = kept
        .lm
        .layers
        .iter()
        .flat_map(|b| b.linears())
        .filter_map(|(_, l)| match &l.weight {
            FrozenWeight::Quantized(q) => Some(format_name(q.format())),
            _ => None,
        })
        .collect();
    formats.sort();
    formats.dedup();
    assert_eq!(formats, ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
    let prompts: Vec<u32> = test_prompts()
        .iter()
        .flat_map(|h| kept.chat_prompt_ids(&h.prompt).unwrap())
        .take(4 * 80)
        .collect();
    let input = Tensor::from_vec(prompts, (4, 80), &Device::Cpu).unwrap();
    kept.lm.set_low_precision_kernels(false);
    let exact = kept.lm.forward(&input).unwrap();
    let diff = common::max_abs_diff(&exact, &dense.lm.forward(&input).unwrap());
    assert!(diff < 1e-3, "kept and dense logits differ by {diff}");
    match tuneforge::cpu::features().int8_kernel() {
        Some(kernel) => common::Int8Departure::measure(&mut kept, &input)
            .assert_small(&format!("q4_k_m export on {kernel}")),
        None => eprintln!("no int8 kernel on this CPU (AVX512_VNNI): its check skipped"),
    }
}

/// An adapter made for another base model is refused, naming both.
#[test]
fn an_adapter_for_another_base_is_refused() {
    tuneforge::threads::init();
    let dir = arch_fixture("qwen3");
    let adapter = tempfile::tempdir().unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir.join("adapter").join(file), adapter.path().join(file)).unwrap();
    }
    let config = adapter.path().join("adapter_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["base_model_name_or_path"] = json!("someone/other-model");
    std::fs::write(&config, c.to_string()).unwrap();
    let mut base = load(&dir);
    base.source.repo = Some("Qwen/Qwen3-0.6B".into());
    let out = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        export(base, adapter.path(), out.path(), &ExportOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("someone/other-model") && err.contains("Qwen/Qwen3-0.6B"),
        "{err}"
    );
}

// ---- llama.cpp -----------------------------------------------------------

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

/// The default model fine-tuned for 30 steps on the bundled data.
fn fine_tuned() -> &'static PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    // As `finetune` does: candle's ops on the calling thread, whole shards on
    // tuneforge's pool (set before any test starts candle's pool).
    tuneforge::threads::init();
    RUN.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("export-run");
        let job = JobConfig {
            out: out.clone(),
            device: "cpu".into(),
            samples: 0,
            train: tuneforge::train::TrainConfig {
                learning_rate: 3e-3,
                max_steps: Some(30),
                eval_every: None,
                save_every: None,
                // The same adapter on every CPU, bf16 arithmetic or not.
                dtype: tuneforge::BaseDtype::F32,
                ..JobConfig::default().train
            },
            ..JobConfig::default()
        };
        run(&job, Existing::Overwrite, None).unwrap();
        out
    })
}

/// Exports the fine-tuned default model into a folder of its own.
fn exported(name: &str, merge: bool, quant: Quant) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("export-{name}"));
    let options = ExportOptions {
        merge,
        quant,
        overwrite: true,
    };
    let report = export(
        common::smollm2_as(tuneforge::DeviceSpec::Cpu, candle_core::DType::F32),
        fine_tuned(),
        &out,
        &options,
    )
    .unwrap();
    eprint!("{}", report.summary());
    out
}

/// The bundled test examples as chat prompts.
fn test_prompts() -> Vec<HeldOut> {
    let data = tuneforge::data::Dataset::load(&JobConfig::default().data).unwrap();
    data.test
        .iter()
        .map(|r| HeldOut::from_record(r).unwrap())
        .collect()
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
