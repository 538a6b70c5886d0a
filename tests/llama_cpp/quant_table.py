"""Measures what each `--quant` costs: exports a run folder with every
quantization given, runs the bundled test examples greedily in llama.cpp and
prints a README table row per quantization (file size, exact answers).

Usage (with the Python that tests/llama_cpp/install.sh prints):
  python tests/llama_cpp/quant_table.py RUN_DIR target/release/examples/export f16 q8_0 q4_k_m
"""
import json, os, subprocess, sys, tempfile
import jinja2, numpy as np, llama_cpp
from llama_cpp import Llama
run = sys.argv[1]; exe = sys.argv[2]
tests = [json.loads(l) for l in open(os.path.join(os.path.dirname(__file__), '../../examples/data/test.jsonl'))]
rows = []
for q in sys.argv[3:]:
    out = os.path.join(tempfile.gettempdir(), 'tuneforge-quant-table', q)
    subprocess.run([exe, '--adapter', run, '--out', out, '--merge', '--quant', q, '--overwrite'], check=True, stdout=subprocess.DEVNULL)
    path = f'{out}/model.gguf'
    llm = Llama(model_path=path, n_ctx=1024, verbose=False, logits_all=True, n_threads=2)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(llm.metadata['tokenizer.chat_template'])
    right = 0
    for t in tests:
        text = tmpl.render(messages=[{'role': 'user', 'content': t['prompt']}], add_generation_prompt=True)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset(); llm.eval(ids)
        gen = []
        for _ in range(48):
            tok = int(np.array(llm.scores[llm.n_tokens-1]).argmax())
            if llama_cpp.llama_vocab_is_eog(vocab, tok): break
            gen.append(tok); llm.eval([tok])
        ans = llm.detokenize(gen).decode(errors='replace').strip()
        right += ans == t['completion'].strip()
    size = os.path.getsize(path) / 1e6
    print(f'| {q} | {size:.0f} MB | {right} of {len(tests)} |', flush=True)
