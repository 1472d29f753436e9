"""selmerge_jax.validation: one message style (argument, value, what is allowed), no bools, floor 0."""

import ast
import math
import pathlib
import re

import numpy as np
import pytest

from selmerge_jax import validation as v
from selmerge_jax.layers import AttentionSpec
from selmerge_jax.models.lora import LoRAConfig
from selmerge_jax.training.train_step import trainable_filter


def _raises(message: str):
    return pytest.raises(ValueError, match="^" + re.escape(message) + "$")


@pytest.mark.parametrize("value", [1, 7, np.int32(3), np.int64(2**40)])
def test_positive_int_accepts_python_and_numpy_ints_and_returns_a_python_int(value):
    out = v.check_positive_int("n", value)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "3", None, np.float32(2)])
def test_positive_int_rejects(value):
    with _raises(f"A.n={value!r}: must be a positive int"):
        v.check_positive_int("A.n", value)


def test_allow_none():
    assert v.check_positive_int("n", None, allow_none=True) is None
    assert v.check_non_negative_int("n", None, allow_none=True) is None
    assert v.check_int("n", None, 1, allow_none=True) is None
    assert v.check_number("x", None, allow_none=True) is None
    assert v.check_positive_number("x", None, allow_none=True) is None
    with _raises("n=0: must be a positive int or None"):
        v.check_positive_int("n", 0, allow_none=True)
    with _raises("x=-1: must be a number >= 0 or None"):
        v.check_number("x", -1, 0, allow_none=True)


def test_non_negative_int():
    assert v.check_non_negative_int("n", 0) == 0
    with _raises("n=-1: must be a non-negative int"):
        v.check_non_negative_int("n", -1)


@pytest.mark.parametrize("low, high, value, message", [
    (1, None, 0, "n=0: must be an int >= 1"),
    (None, 4, 5, "n=5: must be an int <= 4"),
    (1, 4, 5, "n=5: must be an int in [1, 4]"),
    (None, None, 2.0, "n=2.0: must be an int"),
    (0, None, True, "n=True: must be an int >= 0"),
])
def test_int_ranges(low, high, value, message):
    with _raises(message):
        v.check_int("n", value, low, high)


def test_int_in_range_passes_through():
    assert v.check_int("n", 3, 1, 4) == 3 and v.check_int("n", -5) == -5 and v.check_int("n", 4, None, 4) == 4


def test_number_bounds_open_and_closed():
    assert v.check_number("x", 0, 0, 1) == 0
    assert v.check_number("x", 1.0, 0, 1) == 1.0
    assert v.check_number("x", math.inf, 0) == math.inf  # only the bounds limit it
    with _raises("x=0: must be a number in (0, 1]"):
        v.check_number("x", 0, 0, 1, low_open=True)
    with _raises("x=1.0: must be a number in [0, 1)"):
        v.check_number("x", 1.0, 0, 1, high_open=True)
    with _raises("x=0.5: must be a number > 1"):
        v.check_number("x", 0.5, 1, low_open=True)
    with _raises("x=nan: must be a number"):
        v.check_number("x", math.nan)
    with _raises("x=True: must be a number in [0, 10]"):
        v.check_number("x", True, 0, 10)
    with _raises("x='1': must be a number"):
        v.check_number("x", "1")
    assert v.check_number("x", np.float32(0.5), 0, 1) == np.float32(0.5)


def test_positive_number_probability_fraction():
    assert v.check_positive_number("t", 1e-9) == 1e-9
    for bad in (0, -0.5, math.nan, True):
        with _raises(f"t={bad!r}: must be a positive number"):
            v.check_positive_number("t", bad)
    assert v.check_probability("p", 1) == 1
    with _raises("p=1.5: must be a number in [0, 1]"):
        v.check_probability("p", 1.5)
    assert v.check_fraction("f", 0.0) == 0.0
    with _raises("f=1.0: must be a number in [0, 1)"):
        v.check_fraction("f", 1.0)


def test_choice_names_the_value_and_every_allowed_one():
    assert v.check_choice("K.policy", "h2o", ("none", "h2o")) == "h2o"
    assert v.check_choice("K.dtype", "bfloat16", {"float32": 1, "bfloat16": 2}) == "bfloat16"  # a dict's keys
    with _raises("K.policy='lru': must be one of the allowed values; allowed: 'none', 'h2o'"):
        v.check_choice("K.policy", "lru", ("none", "h2o"))
    with _raises("K.policy=['h2o']: must be one of the allowed values; allowed: 'none', 'h2o'"):
        v.check_choice("K.policy", ["h2o"], ("none", "h2o"))


def test_sequences():
    assert v.check_int_sequence("E.lengths", [64, 128], 64) == [64, 128]
    assert v.check_int_sequence("E.lengths", (), non_empty=False) == ()
    with _raises("E.lengths=[]: must be a non-empty list of ints >= 1"):
        v.check_int_sequence("E.lengths", [], 1)
    with _raises("E.lengths=[64, True]: must be a non-empty list of ints"):
        v.check_int_sequence("E.lengths", [64, True])
    with _raises("E.lengths=64: must be a non-empty list of ints in [1, 100]"):
        v.check_int_sequence("E.lengths", 64, 1, 100)
    assert v.check_number_sequence("E.depths", [0, 0.5, 1], 0, 1) == [0, 0.5, 1]
    with _raises("E.depths=[0.5, 2]: must be a non-empty list of numbers in [0, 1]"):
        v.check_number_sequence("E.depths", [0.5, 2], 0, 1)
    with _raises("E.depths=(nan,): must be a non-empty list of numbers"):
        v.check_number_sequence("E.depths", (math.nan,))


def test_shape():
    x = np.zeros((2, 3, 4))
    assert v.check_shape("x", x, (2, None, 4)) == (2, 3, 4)
    with _raises("x.shape=(2, 3, 4): must be (2, *, 5)"):
        v.check_shape("x", x, (2, None, 5))
    with _raises("x.shape=(2, 3, 4): must be (2, 3)"):
        v.check_shape("x", x, (2, 3))
    with _raises("x.shape=None: must be (1,)"):
        v.check_shape("x", [1.0], (1,))


def test_fail_is_the_one_message_format():
    with _raises("A.b=3: must be odd; allowed: 1, 5"):
        v.fail("A.b", 3, "odd", "1, 5")


def test_floor_zero_imports_nothing_from_the_package():
    """Every layer may import it, so it may import no layer (nor anything outside the standard library)."""
    tree = ast.parse(pathlib.Path(v.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "math", "numbers", "collections", "typing"}, imported


def test_configs_use_the_one_style():
    from selmerge_jax.kvcache import KVCompressionConfig
    from selmerge_jax.models import ModelConfig
    from selmerge_jax.training import OptimizerConfig

    with _raises("OptimizerConfig.learning_rate=0.0: must be a number in (0, 10]"):
        OptimizerConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match=r"^ModelConfig\.num_heads=0: must be a positive int$"):
        ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=0, num_kv_heads=1, ffn_dim=8)
    with pytest.raises(ValueError, match=r"^KVCompressionConfig\.quant='int3': must be one of the allowed "):
        KVCompressionConfig(policy="h2o", budget=64, quant="int3")


@pytest.mark.parametrize("build, match", [
    (lambda: LoRAConfig(rank=0), r"LoRAConfig\.rank=0: must be a positive int"),
    (lambda: LoRAConfig(alpha=-1.0), r"LoRAConfig\.alpha=-1\.0: must be"),
    (lambda: AttentionSpec(kind="flash"), r"AttentionSpec\.kind='flash': must be .*allowed: .*'dense'"),
    (lambda: trainable_filter("some"), r"trainable='some': must be .*allowed: .*'all'"),
])
def test_model_and_training_configs_use_the_one_message_style(build, match):
    with pytest.raises(ValueError, match=match):
        build()
