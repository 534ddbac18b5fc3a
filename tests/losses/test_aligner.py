"""The aligner objective: markers as single tokens, the loss mask on y' and [DONE], HF export."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from align_jax.data import aligner_text, make_loader
from align_jax.losses import aligner
from align_jax.methods.aligners import align
from align_jax.methods.aligners_recipe import _tiny_decoder
from align_jax.models import forward, load_hf
from align_jax.tokenizer import load_tokenizer
from align_jax.train.entry import train_main
from align_jax.train.optim import OptimizerConfig

TRIPLES = [
    {"input": "Can I borrow a drill?", "initial_response": "No. Go away.",
     "critique": "rude", "aligned_response": "Yes, members can borrow tools for a week.",
     "criterion": "ethical"},
    {"input": "When is the shop open?", "initial_response": "Whenever.",
     "critique": "vague", "aligned_response": "Tuesday to Saturday, ten to six.",
     "criterion": "helpful"},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligner")
    texts = [t[k] for t in TRIPLES for k in ("input", "initial_response", "aligned_response")]
    src = _tiny_decoder(str(root / "tiny"), texts * 20, preset="tiny", seed=0)
    return aligner.add_marker_tokens(src, str(root / "base"))


def test_markers_are_single_tokens_and_transformers_reads_the_export(base_dir):
    tok = load_tokenizer(base_dir)
    ids = aligner.marker_ids(tok)
    config, params = load_hf(base_dir)
    assert max(ids.values()) < config.vocab_size == tok.vocab_size
    assert json.load(open(f"{base_dir}/aligner_markers.json"))["added"] == list(aligner.MARKERS)
    hf_tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    text = aligner.prompt_text("Can I?", "No.") + " Yes. [DONE]"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokens = np.asarray([aligner_text.prompt_ids(tok, "Can I?", "No.") + [ids["[DONE]"]]])
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_loss_mask_covers_exactly_the_aligned_response_and_done(base_dir):
    tok = load_tokenizer(base_dir)
    loader = make_loader(TRIPLES, kind="aligner", tokenizer=tok, seq_len=64, batch_size=2,
                         shuffle=False, pack=False)
    batch = next(iter(loader))
    done = aligner.marker_ids(tok)["[DONE]"]
    for row, t in enumerate(TRIPLES):
        prompt = [tok.bos_id] + tok.encode(f"[INPUT] {t['input']} [INIT] "
                                           f"{t['initial_response']} [ALIGNED]")
        completion = tok.encode(" " + t["aligned_response"]) + [done]
        full = prompt + completion
        # The four markers are single tokens, in their places: [INPUT] right after BOS.
        ids = aligner.marker_ids(tok)
        assert [tid for tid in full if tid in ids.values()] == [
            ids[m] for m in ("[INPUT]", "[INIT]", "[ALIGNED]", "[DONE]")]
        assert full[1] == ids["[INPUT]"] and full[len(prompt) - 1] == ids["[ALIGNED]"]
        np.testing.assert_array_equal(batch["tokens"][row, :len(full) - 1], full[:-1])
        # Position p predicts token p + 1: scored exactly when p + 1 is in the completion.
        expected = np.zeros(64, np.int32)
        expected[len(prompt) - 1:len(full) - 1] = 1
        np.testing.assert_array_equal(batch["loss_mask"][row], expected)
        scored = batch["targets"][row][expected == 1]
        np.testing.assert_array_equal(scored, completion)
        assert scored[-1] == done and tok.eos_id not in scored


def test_aligner_training_reproduces_its_triples_greedily(base_dir, tmp_path):
    """The real train path (train_main, objective 'aligner') on two triples until the tiny
    decoder memorises them; greedy aligner inference from `[INPUT] x [INIT] y [ALIGNED]`, cut
    at [DONE], then returns exactly y' for each."""
    data = tmp_path / "triples.jsonl"
    # The two triples 32 times over: grain's index shuffle costs ~18 ms per example drawn from
    # a 2-record dataset (its permutation walks a large domain), under 1 ms from 64 records.
    data.write_text("".join(json.dumps(t) + "\n" for t in TRIPLES) * 32)
    summary = train_main(output_dir=str(tmp_path / "run"), data=str(data), objective="aligner",
                         init_from=base_dir, seq_len=64, batch_size=8, pack=False,
                         num_steps=50, rules="dp", progress=False, save_every=50,
                         optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=5))
    assert summary["status"] == "completed"
    hf = str(tmp_path / "run" / "hf")
    config, params = load_hf(hf)
    tok = load_tokenizer(hf)
    inputs = [t["input"] for t in TRIPLES]
    firsts = [t["initial_response"] for t in TRIPLES]
    out = align(config, params, tok, inputs, firsts, max_new_tokens=24)
    assert out == [t["aligned_response"] for t in TRIPLES]
    # The untrained base answers something else: the match is learned, not an artefact.
    base_config, base_params = load_hf(base_dir)
    assert align(base_config, base_params, load_tokenizer(base_dir), inputs, firsts,
                 max_new_tokens=24) != out
