"""``main.infer`` times prefill and decode apart (each ended by ``block_until_ready``): the reported tokens/s
and time to first token are positive, add up to no more than the wall time, and the timed tokens are what
``generate`` produces."""

import time

import numpy as np
from flax import nnx

from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.main import infer
from selmerge_jax.main.config import InferConfig
from selmerge_jax.models import Llama, preset
from selmerge_jax.models.generate import generate
from selmerge_jax.training.checkpoint import InitConfig

MODEL = preset("tiny", d_model=32, ffn_dim=64, num_layers=1)
TIMES = ("prefill_s", "decode_s", "time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s",
         "first_run_s")


def test_prefill_and_decode_are_timed_apart_and_add_up(tmp_path):
    text = "def f(x):\n    return x * 2\n" * 3
    cfg = InferConfig(init=InitConfig(kind="scratch"), model=MODEL, prompt=text, max_new_tokens=6,
                      chunk_size=32, output=str(tmp_path / "infer.jsonl"))
    t0 = time.perf_counter()
    result = infer.run_infer(cfg)
    wall = time.perf_counter() - t0
    for key in TIMES:
        assert np.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # each figure is its own measurement: no rate from a difference of two runs (once 1.5e10 tok/s)
    assert result["prefill_s"] + result["decode_s"] + result["first_run_s"] <= wall
    assert result["total_s"] == result["prefill_s"] + result["decode_s"]
    assert np.isclose(result["prefill_tokens_per_s"] * result["prefill_s"], result["prompt_tokens"])
    assert np.isclose(result["decode_tokens_per_s"] * result["decode_s"], cfg.max_new_tokens - 1)
    assert result["time_to_first_token_s"] == result["prefill_s"]
    assert infer.speeds(40, 1, result)["decode_tokens_per_s"] is None  # one new token: no decode step
    # the timed path generates what generate() does (same compiled functions: no new compile)
    tok = ByteTokenizer()
    ref = generate(Llama(MODEL, rngs=nnx.Rngs(cfg.seed)), tok.encode(text, add_bos=True)[None],
                   max_new_tokens=6, chunk_size=32, eos_ids=())
    assert result["continuation"] == tok.decode(np.asarray(ref.tokens)[0])
