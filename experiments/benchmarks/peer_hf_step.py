"""The peer row of bench_model.py: one LoRA training step of Hugging Face transformers + PEFT in PyTorch.

What users run today: ``LlamaForCausalLM`` at the preset's shape with random bf16 weights, SDPA attention
(flash kernels on a GPU), gradient checkpointing, PEFT LoRA r16 on q/k/v/o, torch AdamW, batch 1. Prints one
JSON line: first step, median step of ``--reps`` after one warm-up, tokens/s and the CUDA allocator's peak.

  python experiments/benchmarks/peer_hf_step.py --preset llama2-7b --seq-len 32768
"""

import argparse
import json
import platform
import statistics
import time

import torch  # an optional dependency: this script is the PyTorch peer
import transformers
from peft import LoraConfig, get_peft_model

SHAPES = {  # the same shapes as selmerge_jax.models.config's presets
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, rope_theta=10000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=tuple(SHAPES), required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers", type=int, default=None)
    args = p.parse_args()
    if args.seq_len <= 0 or args.reps < 1:
        p.error(f"--seq-len={args.seq_len} and --reps={args.reps} must be positive")
    shape = dict(SHAPES[args.preset])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = transformers.LlamaConfig(**shape, max_position_embeddings=max(args.seq_len, 4096),
                                      attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model,
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    model.enable_input_require_grads()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    tokens = torch.randint(0, shape["vocab_size"], (1, args.seq_len + 1), device="cuda")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        t = time.perf_counter()
        out = model(input_ids=inputs, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    first = step()
    times = [step() for _ in range(args.reps)]
    med = statistics.median(times)
    print(json.dumps({"bench": "peer_hf_step", "preset": args.preset, "seq_len": args.seq_len,
                      "layers": shape["num_hidden_layers"], "status": "ok", "attention": "sdpa",
                      "first_step_s": round(first, 3), "reps": args.reps, "step_s": round(med, 4),
                      "step_times": [round(x, 4) for x in times],
                      "tokens_per_s": round(args.seq_len / med, 1),
                      "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": __import__("peft").__version__, "python": platform.python_version(),
                      "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
