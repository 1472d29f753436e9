"""Evaluation building blocks: text-overlap metrics, attended fraction vs the real selection plans, chunked vs
full-forward NLL, uncompressed decode vs generate, RoPE swap, passkey scoring with oracle decoders, config
errors. (Compression ON, the RoPE rule's effect on outputs and the plots run in
test_evaluation_studies.py.)"""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from selmerge_jax.attention import MSAttentionConfig
from selmerge_jax.attention.selection import select_regions
from selmerge_jax.data.tokenizer import ByteTokenizer
from selmerge_jax.evaluation import fidelity, loss_curves, passkey, perplexity
from selmerge_jax.evaluation.common import with_config, with_rope
from selmerge_jax.kvcache import KVCompressionConfig
from selmerge_jax.layers.attention import attended_keys
from selmerge_jax.main import loss_curve_sweep
from selmerge_jax.main.evaluate import config_schema
from selmerge_jax.models import Llama
from selmerge_jax.models.config import preset
from selmerge_jax.models.generate import generate
from selmerge_jax.positional import RopeConfig

MICRO = preset("tiny", d_model=32, ffn_dim=64, num_layers=1, attention="dense")


@pytest.fixture(scope="module")
def micro():
    return Llama(MICRO, rngs=nnx.Rngs(0))


# ---- text metrics ---------------------------------------------------------------------------------------

def _lcs_brute(a, b) -> int:
    for n in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, n))
        if any(c in subs for c in itertools.combinations(a, n)):
            return n
    return 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=7), st.lists(st.integers(0, 3), max_size=7))
def test_rouge_l_matches_brute_force_lcs(a, b):
    lcs = _lcs_brute(a, b)
    want = 0.0 if lcs == 0 else 2 * (lcs / len(b)) * (lcs / len(a)) / (lcs / len(b) + lcs / len(a))
    if not a or not b:
        want = float(a == b)
    assert fidelity.rouge_l(a, b) == pytest.approx(want)


def test_overlap_metrics_on_known_sequences():
    assert fidelity.rouge_l([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert fidelity.compare([5, 6, 7], [5, 6, 7]) == {"jaccard": 1.0, "exact_prefix": 3, "rouge_l": 1.0}
    assert fidelity.compare([1, 2, 3, 9], [1, 2, 4, 9]) == {"jaccard": 3 / 5, "exact_prefix": 2,
                                                            "rouge_l": pytest.approx(0.75)}
    assert fidelity.token_jaccard([1, 1, 2], [3]) == 0.0 and fidelity.exact_prefix([4], [5, 6]) == 0


# ---- attended fraction / FLOPs -----------------------------------------------------------------------------

@pytest.mark.parametrize("top_k, merge, sink", [(2, 1, 0), (6, 2, 2)])
def test_attended_keys_match_the_selection_plan(top_k, merge, sink):
    w, t = 4, 64
    cfg = MSAttentionConfig(block_size=w, top_k=top_k, merge=merge, sink=sink, selection_source="previous",
                            selection_heads="kv")
    q, k = jax.random.normal(jax.random.key(1), (2, 1, t, 2, 8))
    plan = select_regions(q, k, cfg)
    regions = np.asarray(plan.kv_regions)  # [B, P, Q, M]
    group_start = (np.arange(regions.shape[2]) * merge)[None, None, :, None]
    valid = ((regions >= 0) & (regions < group_start)).sum(-1)  # [B, P, Q]
    i = np.arange(t)
    g = i // (w * merge)
    local = i - g * merge * w + 1
    want = valid[..., g] * w + local  # keys per query token, per (B, P)
    got = attended_keys(cfg, t)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)


def test_attended_fraction_and_flops_order():
    ms = preset("tiny", attention="ms")
    fr = [loss_curves.attended_fraction(ms.replace(ms=ms.ms.__class__(block_size=16, top_k=k)), 512)
          for k in (2, 4, 8)]
    assert fr == sorted(fr) and 0 < fr[0] < fr[-1] < 1
    assert loss_curves.attended_fraction(ms.replace(attention="dense"), 512) == 1.0
    assert loss_curves.train_flops_per_token(ms, 512) < loss_curves.train_flops_per_token(
        ms.replace(attention="dense"), 512)


# ---- scoring paths ---------------------------------------------------------------------------------------

def test_chunked_nll_equals_full_forward_for_dense(micro):
    windows = np.random.default_rng(0).integers(0, 256, (2, 65)).astype(np.int32)
    full = perplexity.token_nll(micro, windows, mode="forward")
    chunked = perplexity.token_nll(micro, windows, mode="chunked", chunk_size=16)
    np.testing.assert_allclose(chunked, full, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        perplexity.token_nll(micro, windows[:, :40], chunk_size=16)


def test_chunked_nll_with_sliding_window_is_exact(micro):
    # Windows longer than the sliding window, chunks > 1: the cache masks each query by its own window (it
    # used to hide keys by the chunk's earliest query only, and this case was refused).
    import dataclasses

    model = with_config(micro, dataclasses.replace(MICRO, sliding_window=8))
    windows = np.random.default_rng(0).integers(0, 256, (2, 33)).astype(np.int32)
    full = perplexity.token_nll(model, windows, mode="forward")
    for chunk in (1, 16):
        np.testing.assert_allclose(perplexity.token_nll(model, windows, chunk_size=chunk), full, rtol=2e-5,
                                   atol=2e-5)


def test_uncompressed_decode_is_generate(micro):
    prompts = np.random.default_rng(1).integers(0, 256, (2, 64)).astype(np.int32)
    none, kept = fidelity.compressed_generate(micro, prompts, KVCompressionConfig(policy="none"),
                                              max_new_tokens=5,
                                              chunk_size=32)
    ref = np.asarray(generate(micro, prompts, max_new_tokens=5, eos_ids=(), chunk_size=32).tokens)
    np.testing.assert_array_equal(none, ref)
    np.testing.assert_allclose(kept, 1.0)


def test_with_rope_changes_frequencies_not_weights(micro):
    ntk = with_rope(micro, RopeConfig(rope_type="ntk", factor=8.0))
    assert ntk.config.rope.rope_type == "ntk" and micro.config.rope.rope_type == "default"
    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))
    assert all(a is b for a, b in zip(leaves(micro), leaves(ntk), strict=True))
    assert with_rope(micro, None) is micro
    with pytest.raises(ValueError, match="parameter shapes"):
        with_config(micro, MICRO.replace(d_model=64, ffn_dim=64))


# ---- passkey scoring with oracle decoders ------------------------------------------------------------------

def _oracle(shift: int):
    """A fake ``generate`` that reads the key out of each prompt (plus ``shift`` on its first digit)."""
    tok = ByteTokenizer()

    def fake(model, prompts, *, lengths, max_new_tokens, **kwargs):
        out = np.zeros((len(prompts), max_new_tokens), np.int32)
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            key = tok.decode(p[:n]).split("The pass key is ")[1].split(".")[0]
            ans = tok.encode(f" {key}")
            ans[1] = (ans[1] - ord("0") + shift) % 10 + ord("0")
            out[i, :len(ans)] = ans
        return type("G", (), {"tokens": out})

    return fake


@pytest.mark.parametrize("shift, accuracy", [(0, 1.0), (1, 0.0)])
def test_passkey_scoring_with_oracles(monkeypatch, shift, accuracy):
    monkeypatch.setattr(passkey, "generate", _oracle(shift))
    res = passkey.passkey_accuracy(None, ByteTokenizer(), [300, 400], [0.0, 0.5, 1.0], per_cell=2, seed=3)
    assert np.asarray(res["accuracy"]).shape == (3, 2)
    assert res["mean_accuracy"] == accuracy and len(res["examples"]) == 12
    assert {e["depth"] for e in res["examples"]} == {0.0, 0.5, 1.0}


# ---- configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: passkey.PasskeyEvalConfig(model=MICRO, lengths=(32,)),
     r"PasskeyEvalConfig\.lengths=\(32,\): must be a non-empty list of ints >= 64"),
    (lambda: passkey.PasskeyEvalConfig(model=MICRO, depths=(1.5,)),
     r"PasskeyEvalConfig\.depths=\(1\.5,\): must be a non-empty list of numbers in \[0, 1\]"),
    (lambda: passkey.PasskeyEvalConfig(), r"ModelSource.model is required with init.kind='scratch'"),
    (lambda: perplexity.PerplexityEvalConfig(model=MICRO, lengths=(300,), chunk_size=256), "not multiples"),
    (lambda: perplexity.PerplexityEvalConfig(model=MICRO, modes=("fast",)), "modes must be"),
    (lambda: fidelity.FidelityEvalConfig(model=MICRO, prompt_tokens=100, chunk_size=64), "multiple of chunk"),
    (lambda: fidelity.FidelityEvalConfig(model=MICRO, compressions=(KVCompressionConfig(
        policy="h2o", ratio=0.5, quant="int8"),)), "quant='int8'"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={}), "at least one run"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={"a/b": []}), "without '/'"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={"a": ["no_equals"]}), "key.path=value"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={"a": []}, warm_start=("x",)),
     "warm_start must be"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={"warm": []}, warm_start=("a.b=1",)),
     "may not be named 'warm'"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={"a": []}, seeds=(0, -1)),
     r"seeds must be .* >= 0"),
    (lambda: loss_curve_sweep.LossCurveSweepConfig(variants={"a": []}, seeds=(1, 1)), "repeats a seed"),
])
def test_bad_configs_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_schema_by_file_name():
    assert config_schema("eval_passkey") is passkey.PasskeyEvalConfig
    assert config_schema("eval_loss_curves_gpu") is loss_curve_sweep.LossCurveSweepConfig
    with pytest.raises(ValueError, match="no evaluation study"):
        config_schema("eval_nothing")


def test_loss_sweep_order_check():
    runs = {"dense": {"attended_fraction": 1.0, "final_val_loss": 2.0, "final_train_loss": 1.9},
            "k4": {"attended_fraction": 0.1, "final_val_loss": 2.2, "final_train_loss": 1.8},
            "k8": {"attended_fraction": 0.2, "final_val_loss": 2.1, "final_train_loss": None}}
    assert loss_curves.ordered(runs) == {"pass": True, "order": ["k4", "k8", "dense"],
                                         "final_val_loss": [2.2, 2.1, 2.0]}
    assert loss_curves.ordered(runs, "final_train_loss")["pass"] is False  # k8 has no figure: k4 vs dense
    runs["k8"]["final_val_loss"] = 2.2  # a tie is not an order
    assert not loss_curves.ordered(runs)["pass"]
    assert loss_curves.ordered({"k4": runs["k4"]}) is None
    with pytest.raises(ValueError, match="key='val_loss': must be one of the allowed values; allowed: "):
        loss_curves.ordered(runs, "val_loss")


def test_loss_sweep_rejects_unequal_token_budgets(tmp_path):
    sweep = loss_curve_sweep.LossCurveSweepConfig(variants={"a": [], "b": ["train.steps=7"]},
                                                  output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="same token budget"):
        loss_curve_sweep.run_loss_curves(sweep)
