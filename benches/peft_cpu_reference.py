#!/usr/bin/env python3
"""PyTorch + PEFT on the CPU, on the workload of `cargo run --release --example bench`.

SmolLM2-135M's shapes (random weights: the same arithmetic as the real model),
LoRA r=8 (alpha 16, no dropout) on all seven linears or on q and v, AdamW at
lr 1e-4, batch 4 x 128 and 8 x 256 of synthetic ids, every next token trained;
and a forward pass without gradients over 4 x 128. Three configurations, as a
PyTorch user would try them:

- f32: everything f32;
- bf16 autocast: f32 weights, matmuls under torch.autocast(bfloat16);
- bf16 base: the base model in bf16, PEFT's adapters f32 (its default).

Each row runs in its own process on all cores (torch's threads), so its peak
RSS is its own. FLOPs are counted as tuneforge's bench counts them
(examples/bench/flops.rs): 4·N per token for the frozen matmuls of a training
step (2·N forward), 12·s̄·d·L for causal attention (4·s̄·d·L forward), with
s̄ = (s + 1) / 2, and 6·r·(in + out) per adapted linear (2·r·(in + out) forward).

    /work/venv/bin/python benches/peft_cpu_reference.py --reps 3
    /work/venv/bin/python benches/peft_cpu_reference.py --only "4 x 128" --json peft_cpu.json
"""

import argparse
import json
import os
import resource
import time

from peft_reference import run_rows, write_json

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORKLOADS = [
    # name, targets, batch rows, tokens per row, trains
    ("forward, no grad, 4 x 128", ALL7, 4, 128, False),
    ("train, all-7, r=8, 4 x 128", ALL7, 4, 128, True),
    ("train, all-7, r=8, 8 x 256", ALL7, 8, 256, True),
    ("train, q+v, r=8, 4 x 128", ["q_proj", "v_proj"], 4, 128, True),
    ("train, q+v, r=8, 8 x 256", ["q_proj", "v_proj"], 8, 256, True),
]
PRECISIONS = ["f32", "bf16 autocast", "bf16 base"]


def config():
    """SmolLM2-135M's shapes, as tuneforge's ModelConfig::smollm2_135m."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True,
    )


def flops_per_token(model, cfg, seq, trains):
    """FLOPs per token, counted as examples/bench/flops.rs counts them."""
    import torch

    h, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size
    frozen = per_layer * layers + cfg.vocab_size * h
    adapters = 0.0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            a, b = lora_a["default"], module.lora_B["default"]
            adapters += 2 * a.out_features * (a.in_features + b.out_features)
    keys = (seq + 1) / 2
    attention = 4 * keys * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    if trains:
        return 4 * frozen + 3 * attention + 3 * adapters
    return 2 * frozen + attention


def run_row(workload, precision, reps):
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    name, targets, b, s, trains = workload
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("TUNEFORGE_THREADS", os.cpu_count())))
    cfg = config()
    dtype = torch.bfloat16 if precision == "bf16 base" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16 autocast"
        else contextlib.nullcontext
    )
    vocab = cfg.vocab_size
    ids = torch.tensor([[(r * s + i) * 7919 % vocab for i in range(s)] for r in range(b)])
    if trains:
        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                       task_type="CAUSAL_LM"),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                model(input_ids=ids, labels=ids)

    step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    seconds = (time.perf_counter() - start) / reps
    flops = flops_per_token(model, cfg, s, trains)
    return {
        "name": f"{name}, PyTorch + PEFT {precision}",
        "seconds": seconds,
        "tokens_per_second": b * s / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
        "gflops": flops * b * s / seconds / 1e9,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--json")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [(w, p) for w in WORKLOADS for p in PRECISIONS]
    if args.row:
        w, p = next((w, p) for w, p in rows if f"{w[0]}, PyTorch + PEFT {p}" == args.row)
        print(json.dumps(run_row(w, p, args.reps)))
        return
    names = [f"{w[0]}, PyTorch + PEFT {p}" for w, p in rows]
    results = run_rows(__file__, [n for n in names if args.only in n], args.reps)
    print(f"| {'configuration':<58} | {'s/step':>8} | {'tokens/s':>9} | {'peak RSS (MB)':>13} "
          f"| {'GFLOP/s':>8} |")
    for r in results:
        print(f"| {r['name']:<58} | {r['seconds']:>8.3f} | {r['tokens_per_second']:>9.1f} "
              f"| {r['peak_rss_mb']:>13.0f} | {r['gflops']:>8.1f} |")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
