"""Top-k of selection's score rows on one device: ``lax.top_k`` against the alternatives selection weighed.

Rows of ``[1, P=8, C, R]`` float32 scores (C query groups of one selection step, R regions), k = 16 (top-17
with one local region): ``lax.top_k``; rounds of argmax-and-mask; the tile filter then rounds (what
``attention.selection._top_k`` does, and the same with tiles of ``TILES`` columns); a two-stage ``lax.top_k``
(per 128 or 512 columns, then of the survivors); ``lax.approx_max_k``; a full sort; and the score matmul
itself. Median ms of ``--reps`` after one warm-up, one JSON line per shape.

    python experiments/benchmarks/bench_topk.py --out experiments/results/<dir>/topk.jsonl
"""

import argparse
import json
import platform
import statistics

import jax
import jax.numpy as jnp
from bench_attention import time_fn  # beside this script

from selmerge_jax.attention import selection

SHAPES = ((1024, 1024), (8192, 1024), (8192, 256))  # (R, C): 128K and 1M tokens of 128-token regions
TILES = (8, 16, 32, 64, 128)  # columns per tile of the filter (selection._tile_width picks one by R and k)


def median_ms(fn, *args, reps: int) -> float:
    return round(statistics.median(time_fn(jax.jit(fn), args, reps, warmup=1)), 3)


def two_stage(s, k: int, width: int):
    """``lax.top_k`` per ``width`` columns, then of the survivors."""
    *lead, r = s.shape
    v, i = jax.lax.top_k(s.reshape(*lead, r // width, width), k)
    i = i + (jnp.arange(r // width) * width)[:, None]
    v2, j = jax.lax.top_k(v.reshape(*lead, -1), k)
    return v2, jnp.take_along_axis(i.reshape(*lead, -1), j, -1)


def row(r: int, c: int, k: int, reps: int) -> dict:
    src = jax.random.normal(jax.random.PRNGKey(0), (1, c, 8, 128))
    kbar = jax.random.normal(jax.random.PRNGKey(1), (1, r, 8, 128))
    s = jnp.einsum("bcph,brph->bpcr", src, kbar)
    want = jax.lax.top_k(s, k)[1]
    ours = jax.jit(lambda s: selection._top_k(s, k))(s)[1]
    return {"R": r, "C": c, "k": k, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "python": platform.python_version(),
            "einsum": median_ms(lambda a, b: jnp.einsum("bcph,brph->bpcr", a, b), src, kbar, reps=reps),
            "lax_top_k": median_ms(lambda s: jax.lax.top_k(s, k), s, reps=reps),
            "rounds": median_ms(lambda s: selection._rounds(s, k), s, reps=reps),
            "selection_top_k": median_ms(lambda s: selection._top_k(s, k), s, reps=reps),
            "tile_width": selection._tile_width(r, k),
            **{f"tiles{t}": median_ms(lambda s, t=t: selection._top_k_rounds(s, k, t), s, reps=reps)
               for t in TILES},
            "two_stage128": median_ms(lambda s: two_stage(s, k, 128), s, reps=reps),
            "two_stage512": median_ms(lambda s: two_stage(s, k, 512), s, reps=reps),
            "approx_max_k": median_ms(lambda s: jax.lax.approx_max_k(s, k, recall_target=1.0), s, reps=reps),
            "sort_full": median_ms(lambda s: jnp.sort(s, -1), s, reps=reps),
            "selection_top_k_equal": bool((ours == want).all())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for r, c in SHAPES:
        line = json.dumps(row(r, c, args.k, args.reps))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
