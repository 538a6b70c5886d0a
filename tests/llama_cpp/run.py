"""Runs GGUF files in llama.cpp (through llama-cpp-python) for tuneforge's
export tests: reads a JSON job on stdin, writes JSON results on stdout.

Job: {"model": PATH, "lora": PATH or null, "n_ctx": N,
      "prompts": [[token ids], ...], "max_new_tokens": N, "logits": bool,
      "chat": [{"role": ..., "content": ...}, ...] or null,
      "tokenize": [texts] (optional)}
Result: {"last_logits": [[floats] per prompt], "greedy": [[ids] per prompt],
         "stopped_at_eog": [bool per prompt], "eog": [ids],
         "rendered_chat": str or null, "metadata": {key: value},
         "tokens": [[ids] per text to tokenize] (no BOS, special tokens parsed)}

Greedy decoding is written out (argmax of llama.cpp's logits, one token at a
time) so that no sampler setting stands between the two implementations.
"""
import json
import sys

import jinja2
import llama_cpp
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
llm = Llama(
    model_path=job["model"],
    lora_path=job.get("lora"),
    n_ctx=job.get("n_ctx", 1024),
    n_threads=2,
    n_batch=512,
    logits_all=True,  # with False, llama-cpp-python leaves scores[n - 1] at zero
    verbose=False,
)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
n_vocab = llm.n_vocab()
out = {"last_logits": [], "greedy": [], "stopped_at_eog": []}
for prompt in job["prompts"]:
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[llm.n_tokens - 1][:n_vocab])
    out["last_logits"].append(logits.tolist() if job.get("logits", True) else None)
    ids, stopped = [], False
    for _ in range(job.get("max_new_tokens", 32)):
        tok = int(logits.argmax())
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            stopped = True
            break
        ids.append(tok)
        llm.eval([tok])
        logits = np.array(llm.scores[llm.n_tokens - 1][:n_vocab])
    out["greedy"].append(ids)
    out["stopped_at_eog"].append(stopped)
out["eog"] = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
meta = llm.metadata
out["metadata"] = {k: v for k, v in meta.items() if len(v) < 200}
out["rendered_chat"] = None
if job.get("chat") is not None:
    template = meta["tokenizer.chat_template"]
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    out["rendered_chat"] = env.from_string(template).render(
        messages=job["chat"], add_generation_prompt=True,
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode() if llm.token_bos() >= 0 else "",
        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
    )
out["tokens"] = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in job.get("tokenize", [])]
json.dump(out, sys.stdout)
