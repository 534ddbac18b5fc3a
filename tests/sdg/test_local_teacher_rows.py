"""The local teacher with continuous batching (rows=) writes what its `generate` path writes."""

import jax
import numpy as np
import pytest

from align_jax.models.config import get_config
from align_jax.models.transformer import init_params
from align_jax.sdg.backends import LocalTeacher
from align_jax.tokenizer_training import train_tokenizer

TEXT = ["Honesty, care, fairness and respect are values we write down and keep.",
        "A teacher reads a document and writes questions with grounded answers."]
PROMPTS = ["Honesty", "A teacher reads", "values we", "care and", "questions"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = train_tokenizer(TEXT * 10, tmp_path_factory.mktemp("tok"), vocab_size=300)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, max_position=64, init_std=0.3,
                     tie_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    params = init_params(cfg, jax.random.key(1))
    params["lm_head"] = params["lm_head"].at[:, np.asarray(
        [i for i in range(263) if i != tok.eos_id])].set(0.0)
    return cfg, params, tok


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.9, 0.9)])
def test_rows_teacher_writes_what_the_generate_teacher_writes(model, temperature, top_p):
    rows = LocalTeacher(model, max_len=48, rows=2)
    plain = LocalTeacher(model, max_len=48)
    kw = dict(temperature=temperature, top_p=top_p, max_tokens=10, seed=7)
    # Five prompts through two rows: three of them join after others finished.
    assert rows.complete(PROMPTS, **kw) == plain.complete(PROMPTS, **kw)
    assert rows.engine.inserts == len(PROMPTS)


def test_rows_teacher_names_itself_on_bad_input(model):
    rows = LocalTeacher(model, max_len=48, rows=2)
    with pytest.raises(ValueError, match="local teacher .*exceed the context"):
        rows.complete(["Honesty"], temperature=0.0, max_tokens=60)
