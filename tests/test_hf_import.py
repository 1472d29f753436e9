"""HF checkpoint import/export: parity with transformers (``hf`` marker), bitwise round trips, clear
errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from selmerge_jax.models import Llama, config_from_hf, config_to_hf, load_hf, preset, save_hf
from selmerge_jax.models.generate import generate
from selmerge_jax.positional import RopeConfig

_SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
# name -> (architecture, extra HF config); GQA (4 query heads over 2 kv heads) except the "mha" variant.
_VARIANTS = {
    "llama3_rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16},
                              "rope_theta": 500000.0}),
    "llama_yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 16},
                             "max_position_embeddings": 64}),
    "llama_dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                "max_position_embeddings": 16}),
    "llama_linear_tied_mha": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                        "tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral_window": ("mistral", {"sliding_window": 8}),  # default RoPE
}


def _params(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, value in a.items():
        x, y = np.asarray(value), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def tiny_model():
    return Llama(preset("tiny", vocab_size=64, d_model=32, ffn_dim=48), rngs=nnx.Rngs(0))


def _hf_dir(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    arch, extra = _VARIANTS[name]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](**{**_SMALL, **extra})).eval()
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return model, path


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    torch = pytest.importorskip("torch")
    hf_model, path = _hf_dir(tmp_path, name)
    ids = np.random.RandomState(0).randint(0, 64, (2, 24))  # 24 > window 8 and > the 16-token L0 of the rules
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    model = load_hf(path)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    assert np.abs(np.asarray(out) - ref).max() <= 1e-4


@pytest.mark.hf
@pytest.mark.parametrize("name", ["llama3_rope", "mistral_window"])
def test_greedy_continuation_matches_transformers(tmp_path, name):
    torch = pytest.importorskip("torch")
    hf_model, path = _hf_dir(tmp_path, name)
    prompt = np.random.RandomState(1).randint(0, 64, (1, 7))  # fits Mistral's window; decode runs past it
    new = 12
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 7:].numpy()
    out = generate(load_hf(path), prompt, max_new_tokens=new, eos_ids=(), chunk_size=4)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), ref)


@pytest.mark.hf
def test_transformers_loads_our_export(tmp_path, tiny_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save_hf(tiny_model, str(tmp_path))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = np.random.RandomState(0).randint(0, 64, (1, 20))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(nnx.jit(lambda m, x: m(x))(tiny_model, jnp.asarray(ids))) - ref).max() <= 1e-4


def test_export_import_round_trip_is_bitwise(tmp_path, tiny_model):
    save_hf(tiny_model, str(tmp_path / "a"))
    loaded = load_hf(str(tmp_path / "a"))
    _assert_bitwise(_params(tiny_model), _params(loaded))
    save_hf(loaded, str(tmp_path / "b"))
    _assert_bitwise(load_file(str(tmp_path / "a" / "model.safetensors")),
                    load_file(str(tmp_path / "b" / "model.safetensors")))


def test_sharded_export_and_import(tmp_path, tiny_model):
    save_hf(tiny_model, str(tmp_path), max_shard_bytes=16_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    _assert_bitwise(_params(tiny_model), _params(load_hf(str(tmp_path))))


def test_bfloat16_export_casts_and_round_trips(tmp_path, tiny_model):
    save_hf(tiny_model, str(tmp_path / "a"), dtype="bfloat16")
    as_f32 = load_hf(str(tmp_path / "a"))  # cast up to the config's float32 params
    for name, value in _params(as_f32).items():
        expected = np.asarray(_params(tiny_model)[name]).astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(value), expected)
    as_bf16 = load_hf(str(tmp_path / "a"), param_dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in _params(as_bf16).values())
    save_hf(as_bf16, str(tmp_path / "b"))
    _assert_bitwise(load_file(str(tmp_path / "a" / "model.safetensors")),
                    load_file(str(tmp_path / "b" / "model.safetensors")))


@pytest.mark.parametrize("config", [
    preset("tiny"), preset("mistral-7b"), preset("llama3-8b", eos_token_id=(128001, 128009)),
    preset("tiny", tie_embeddings=True, rope=RopeConfig(rope_type="linear", factor=2.0)),
    preset("tiny", rope=RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)),
])
def test_config_round_trip(config):
    # HF has no select-and-merge settings and always writes head_dim explicitly.
    back = config_from_hf(json.loads(json.dumps(config_to_hf(config))), ms=config.ms)
    assert back == config.replace(head_dim=config.head_size)


def _corrupt(tmp_path, model, edit):
    save_hf(model, str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    return str(tmp_path)


def test_missing_tensor_is_named(tmp_path, tiny_model):
    path = _corrupt(tmp_path, tiny_model, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"1 missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf(path)


def test_unexpected_tensor_is_named(tmp_path, tiny_model):
    path = _corrupt(tmp_path, tiny_model,
                    lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.9\.extra"):
        load_hf(path)


def test_legacy_rotary_buffers_are_ignored(tmp_path, tiny_model):
    path = _corrupt(tmp_path, tiny_model,
                    lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4,
                                                                                                np.float32)}))
    _assert_bitwise(_params(tiny_model), _params(load_hf(path)))


def test_wrong_shape_is_named(tmp_path, tiny_model):
    path = _corrupt(tmp_path, tiny_model, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape"):
        load_hf(path)


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
])
def test_unsupported_configs_raise(tmp_path, tiny_model, edit, message):
    save_hf(tiny_model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**hf, **edit}, f)
    with pytest.raises(ValueError, match=message):
        load_hf(str(tmp_path))


def test_directory_without_safetensors(tmp_path, tiny_model):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_to_hf(tiny_model.config), f)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_hf(str(tmp_path))


def test_import_overrides_and_no_random_init(tmp_path, tiny_model):
    save_hf(tiny_model, str(tmp_path))
    model = load_hf(str(tmp_path), attention="ms", dtype="bfloat16")
    assert model.config.attention == "ms" and model.config.dtype == "bfloat16"
    assert all(isinstance(v, jax.Array) for v in _params(model).values())
    assert os.path.getsize(tmp_path / "model.safetensors") > 0
