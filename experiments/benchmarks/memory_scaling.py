"""Peak memory of ms_attention vs dense_attention as T grows with a fixed attended budget (top_k * W).

Peak memory comes from XLA's compiled memory analysis (arguments + outputs + temporaries of the jitted forward
or forward+backward), so nothing of size O(T^2) is ever allocated: the dense 64K case is compiled, not run.
Writes JSON lines and a PNG; prints a table. CPU is fine:

    python experiments/benchmarks/memory_scaling.py \
        --out experiments/results/memory_cpu/memory_scaling_cpu.jsonl
"""

import argparse
import json
import pathlib
import platform

import jax
import jax.numpy as jnp

from selmerge_jax.attention import MSAttentionConfig, dense_attention, ms_attention


def compiled_peak_bytes(fn, *args) -> int:
    """Arguments + outputs + temporaries of the compiled function (what the device must hold at once)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def measure(seq_len: int, cfg: MSAttentionConfig, heads: int, head_dim: int, backward: bool) -> dict:
    spec = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.float32)
    ms = lambda q, k, v: ms_attention(q, k, v, cfg)
    dense = lambda q, k, v: dense_attention(q, k, v)
    if backward:
        ms = jax.grad(lambda q, k, v, f=ms: f(q, k, v).sum(), argnums=(0, 1, 2))
        dense = jax.grad(lambda q, k, v, f=dense: f(q, k, v).sum(), argnums=(0, 1, 2))
    return dict(
        seq_len=seq_len, heads=heads, head_dim=head_dim, backward=backward, block_size=cfg.block_size,
        top_k=cfg.top_k, merge=cfg.merge, attended_tokens=cfg.attended_tokens,
        attended_fraction=min(1.0, cfg.attended_tokens / seq_len),
        ms_bytes=compiled_peak_bytes(ms, spec, spec, spec),
        dense_bytes=compiled_peak_bytes(dense, spec, spec, spec),
        device=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version(),
    )


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    t = [r["seq_len"] for r in rows]
    ax.loglog(t, [r["dense_bytes"] / 2**20 for r in rows], "o-", label="dense_attention")
    ax.loglog(t, [r["ms_bytes"] / 2**20 for r in rows], "s-",
              label=f"ms_attention (top_k*W={rows[0]['attended_tokens']})")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("compiled peak memory (MiB)")
    ax.set_title("forward+backward" if rows[0]["backward"] else "forward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--merge", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--out", default="runs/memory_scaling.jsonl")
    args = parser.parse_args(argv)
    # Pinned: results/INDEX.md R6 was measured with the paper's within-group selection (then the default).
    cfg = MSAttentionConfig(block_size=args.block_size, top_k=args.top_k, merge=args.merge,
                            selection_source="group")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [measure(int(t), cfg, args.heads, args.head_dim, args.backward) for t in args.lengths.split(",")]
    print(f"{'T':>8} {'attended':>9} {'ms MiB':>10} {'dense MiB':>11} {'dense/ms':>9}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['attended_fraction']:>9.3f} {r['ms_bytes'] / 2**20:>10.1f} "
              f"{r['dense_bytes'] / 2**20:>11.1f} {r['dense_bytes'] / r['ms_bytes']:>9.1f}")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
