"""evaluation/ruler.py: the RULER-style prompts plant what they say, and the scoring reads the answer from the
cache the prefill left (with a full cache, exactly the model's own forward on the whole prompt)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selmerge_jax.evaluation import ruler
from selmerge_jax.models import Llama, preset


@pytest.mark.parametrize("name", ruler.TASKS)
def test_examples_plant_the_needles_and_ask_at_the_end(name):
    task = ruler.RulerTask(name=name, needles=3, hops=3)
    prompts, answers = ruler.examples(task, 40, 6, seed=0)
    assert prompts.shape == (6, 40) and answers.shape == (6, 1)
    assert (prompts[:, -2] == ruler.QUERY).all()
    planted = (prompts[:, :-2] < ruler.VOCAB - 64).sum(1)  # every id below the filler range is a needle
    assert (planted == 3).all()  # needles=3, and variable tracking's chain of hops=3 assignments
    assert ((answers >= 8) & (answers < 24)).all()
    with pytest.raises(ValueError, match=r"length=8: must be"):
        ruler.examples(task, 8, 1, seed=0)


def test_full_cache_accuracy_is_the_models_own_answer():
    model = Llama(preset("tiny", vocab_size=ruler.VOCAB, d_model=32, ffn_dim=48, num_layers=1),
                  rngs=nnx.Rngs(0))
    prompts, _ = ruler.examples(ruler.RulerTask(name="niah_multikey", needles=2), 24, 4, seed=1)
    own = np.argmax(np.asarray(model(jnp.asarray(prompts)))[:, -1], -1)[:, None]
    assert ruler.accuracy(model, prompts, own, protocol="question_agnostic", batch=4) == 1.0
