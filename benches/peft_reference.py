#!/usr/bin/env python3
"""PyTorch + PEFT on the workload of `cargo run --example bench -- --suite gpu`.

Random weights at SmolLM2-135M's and Qwen2.5-0.5B's shapes in bf16, LoRA r=16
(alpha 32, no dropout) on all seven linears with f32 adapter weights (PEFT's
default), AdamW at lr 1e-4, batch 8 x 512 and 16 x 1024 of the same synthetic
ids, every next token trained. Attention is PyTorch's SDPA, transformers'
default. Each row runs in its own process. Peak GPU memory is NVML's used-memory
reading of the device, sampled every 2 ms, above the reading taken before the
process initialised CUDA: the CUDA context included, exactly as tuneforge's
bench measures itself. torch's own allocator peaks are printed beside it.

    python3 benches/peft_reference.py --reps 10 --json peft.json
    python3 benches/peft_reference.py --only qwen
"""

import argparse
import json
import subprocess
import sys
import threading
import time

ROWS = [
    ("smollm2-135m, all-7 r=16, 8 x 512", "smollm2", 8, 512),
    ("smollm2-135m, all-7 r=16, 16 x 1024", "smollm2", 16, 1024),
    ("qwen2.5-0.5b, all-7 r=16, 8 x 512", "qwen2.5", 8, 512),
    ("qwen2.5-0.5b, all-7 r=16, 16 x 1024", "qwen2.5", 16, 1024),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(shape):
    """The same shapes as tuneforge's ModelConfig::smollm2_135m / qwen2_5_0_5b."""
    from transformers import LlamaConfig, Qwen2Config

    if shape == "smollm2":
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
            max_position_embeddings=8192, tie_word_embeddings=True,
        )
    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


class GpuMemory:
    """Peak of NVML's used memory above the reading at start, sampled every 2 ms."""

    def __init__(self, index=0):
        import pynvml

        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.used = lambda: pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.baseline = self.used()
        self.peak = self.baseline
        self.stop = False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.used())
            time.sleep(0.002)

    def finish(self):
        self.stop = True
        self.thread.join()
        return (self.peak - self.baseline) / 1e6


def run_row(name, shape, b, s, reps):
    memory = GpuMemory()  # before CUDA is initialised
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(shape), dtype=torch.bfloat16).cuda()
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                   task_type="CAUSAL_LM"),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.tensor(
        [[(r * s + i) * 7919 % vocab for i in range(s)] for r in range(b)], device="cuda"
    )

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    params = sum(p.numel() for p in model.base_model.model.parameters() if not p.requires_grad)
    return {
        "name": name,
        "seconds": seconds,
        "tokens_per_second": b * s / seconds,
        "peak_gpu_mb": memory.finish(),
        "torch_max_allocated_mb": torch.cuda.max_memory_allocated() / 1e6,
        "torch_max_reserved_mb": torch.cuda.max_memory_reserved() / 1e6,
        "gflops": 4 * params * b * s / seconds / 1e9,
        "lora_dtype": str(next(p.dtype for p in model.parameters() if p.requires_grad)),
    }


def run_rows(script, names, reps):
    """Runs each row of `script` in its own process (`--row NAME`); its results."""
    results = []
    for name in names:
        out = subprocess.run(
            [sys.executable, script, "--row", name, "--reps", str(reps)],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            sys.exit(f"row '{name}' failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def write_json(path, results):
    """Writes the rows to `path` atomically (a temporary file, then a rename)."""
    import os

    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--json")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        row = next(r for r in ROWS if r[0] == args.row)
        print(json.dumps(run_row(*row, args.reps)))
        return
    names = [name for name, *_ in ROWS if args.only in name]
    results = run_rows(__file__, names, args.reps)
    print(f"| {'configuration':<36} | {'s/step':>8} | {'tokens/s':>9} | {'peak GPU (MB)':>13} "
          f"| {'torch alloc/reserved (MB)':>25} | {'GFLOP/s':>8} |")
    for r in results:
        torch_mb = f"{r['torch_max_allocated_mb']:.0f} / {r['torch_max_reserved_mb']:.0f}"
        print(f"| {r['name']:<36} | {r['seconds']:>8.3f} | {r['tokens_per_second']:>9.1f} "
              f"| {r['peak_gpu_mb']:>13.0f} | {torch_mb:>25} | {r['gflops']:>8.1f} |")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
