"""Projected step time and MFU of Llama-3-8B training with the MS ring (and the dense ring) at 1M-10M tokens
on 8-64 H100s or TPU v5p chips: a cost model calibrated by this project's single-device measurements plus a
ring communication model. Prints (or appends to ``--out``) one JSON line per (device, chips, tokens,
attention).

    python experiments/benchmarks/scaling_model.py                     # the table of docs/SCALING.md
    python experiments/benchmarks/scaling_model.py --out /tmp/scaling.jsonl

Every constant is named below with its source; docs/SCALING.md states the assumptions and which measurement
would confirm each first. Nothing here runs JAX.
"""

from __future__ import annotations

import argparse
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"

# Llama-3-8B: 32 layers, d_model 4096, 32 query / 8 kv heads of 128, ffn 14336, vocab 128256
P, L, D, N, K, H = 8.03e9, 32, 4096, 32, 8, 128
BF16, F32 = 2, 4
MS_KEYS = 16 * 128 + 64  # selected regions of W=128 + half the causal local block, per query (R4's shape)


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / path).read_text().splitlines() if line.strip()]


def calibration() -> dict:
    """Per-token costs from the measured files (H100 attention rows, H200 model-step rows)."""
    layer = {r["mode"]: r["ms"] / 1e3 for r in _rows("attention_h100/run8_1m.jsonl")}
    grads = next(r["ms"] / 1e3 for r in _rows("attention_h100/run8_1m_grads.jsonl") if r["mode"] == "grads")
    dense = {r["mode"]: r["ms"] / 1e3 for r in _rows("attention_h100/run2.jsonl")
             if r.get("kind") == "dense_extrapolation" and r["seq_len"] == 2**20}
    step = next(r for r in _rows("model_h200/llama3_8b_lora.jsonl")
                if r["attention"] == "ms" and r.get("status") == "ok")
    t = 2**20
    # one MS layer per token: backward (grads), plus the forward once more for full remat (R4)
    ms_attn = L * (grads + layer["fwd"]) / t
    lora_token = step["step_s"] / step["seq_len"]  # the whole 8B LoRA step per token at 32K (R26)
    linear_lora = lora_token - ms_attn  # projections, MLP, loss: 6P FLOPs/token with remat (4P useful)
    return {
        "ms_attn_s_per_token": ms_attn,
        "linear_s_per_token_lora": linear_lora,
        # full training adds the weight-gradient GEMMs: 8P instead of 6P hardware FLOPs per token
        "linear_s_per_token_full": linear_lora * 8 / 6,
        # dense causal layer at 1M (cuDNN, extrapolated from 256K): fwd+bwd plus the remat forward
        "dense_layer_s_at_1m": dense["fwdbwd"] + dense["fwd"],
        "implied_linear_tflops": 6 * P / linear_lora / 1e12,
        "sources": ["attention_h100/run8_1m.jsonl", "attention_h100/run8_1m_grads.jsonl",
                    "attention_h100/run2.jsonl", "model_h200/llama3_8b_lora.jsonl"],
    }


# Per chip: peak bf16 FLOP/s; HBM; the bandwidth of one ring hop inside a node / slice and across nodes
# (per direction, derated to what collectives reach); the calibration device's peak (H100 = H200 compute).
DEVICES = {
    "H100": {"peak": 989e12, "hbm_gb": 80, "link_in": 0.7 * 450e9, "link_out": 0.8 * 50e9, "per_node": 8},
    "TPUv5p": {"peak": 459e12, "hbm_gb": 95, "link_in": 0.8 * 100e9, "link_out": 0.8 * 100e9,
               "per_node": 4096},  # one ICI slice: no slower tier up to 64 chips
}
CALIBRATION_PEAK = 989e12


def project(device: str, chips: int, tokens: int, attention: str, cal: dict) -> dict:
    dev = DEVICES[device]
    speed = CALIBRATION_PEAK / dev["peak"]  # same fraction of peak as measured on the H100/H200
    t = tokens / chips  # tokens per chip: one sequence, the ring over every chip (seq = chips)
    linear = t * cal["linear_s_per_token_full"] * speed
    if attention == "ms":
        attn = t * cal["ms_attn_s_per_token"] * speed
    else:  # dense causal, zig-zag balanced: each chip does 1/chips of the full T x T layer work
        attn = L * cal["dense_layer_s_at_1m"] * (tokens / 2**20) ** 2 / chips * speed
    link = dev["link_in"] if chips <= dev["per_node"] else dev["link_out"]
    # Ring bytes per layer per link: the K/V shard (t x K x H x 2 x bf16) makes chips-1 hops in the forward,
    # again in the remat forward, and in the backward together with float32 dK/dV: 5 shard-sized units.
    kv_shard = t * K * H * 2 * BF16
    ring_layer = 5 * (chips - 1) * kv_shard / link
    ring_exposed = L * max(0.0, ring_layer - attn / L)  # a hop hides behind that hop's attention only
    # FSDP over all chips: bf16 params gathered for forward, remat and backward; f32 grads reduce-scattered
    fsdp_bytes = (3 * BF16 + F32) * P * (chips - 1) / chips
    fsdp_exposed = max(0.0, fsdp_bytes / link - linear)  # overlapped with the matmuls
    step = linear + attn + ring_exposed + fsdp_exposed
    keys = MS_KEYS if attention == "ms" else tokens / 2
    useful = 6 * P * tokens + 3.5 * 4 * L * N * H * keys * tokens
    dense_flops = 6 * P * tokens + 3.5 * 4 * L * N * H * (tokens / 2) * tokens
    memory_gb = (16 * P / chips + L * t * D * BF16 + 24 * t * D * BF16) / 1e9  # states, layer inputs, a layer
    return {
        "device": device, "chips": chips, "tokens": tokens, "attention": attention, "tokens_per_chip": t,
        "step_s": round(step, 2), "compute_s": round(linear + attn, 2), "attention_s": round(attn, 2),
        "ring_bytes_per_link_per_step": int(L * 5 * (chips - 1) * kv_shard),
        "ring_s": round(L * ring_layer, 2), "ring_exposed_s": round(ring_exposed, 2),
        "fsdp_exposed_s": round(fsdp_exposed, 2), "mfu": round(useful / (chips * dev["peak"] * step), 3),
        "dense_equivalent_mfu": round(dense_flops / (chips * dev["peak"] * step), 3),
        "memory_gb_per_chip": round(memory_gb, 1), "fits_hbm": memory_gb < dev["hbm_gb"],
        "link_gbps_per_hop": link / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="append the JSON lines here (default: print)")
    args = parser.parse_args()
    cal = calibration()
    rows = [{"kind": "calibration", **cal}]
    for device in DEVICES:
        for chips in (8, 32, 64):
            for tokens in (2**20, 2**22, 10 * 2**20):
                for attention in ("ms", "dense"):
                    rows.append({"kind": "projection", **project(device, chips, tokens, attention, cal)})
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
