"""BERTScore with align_jax's encoder equals the bert-score package on a tiny local BERT."""

import numpy as np
import pytest

from align_jax.eval import bertscore

HYPS = ["Employees must report any gift above fifty dollars to their manager.",
        "Refuse the gift politely.",
        "The policy says nothing about meals.",
        "",
        "Report it, then refuse it politely and honestly."]
REFS = ["Report gifts worth more than fifty dollars to your manager.",
        "Politely refuse gifts from suppliers.",
        "Business meals are allowed when they are modest.",
        "Ask the ethics office.",
        "Refuse it politely and report it honestly."]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 3-layer BERT with a WordPiece vocabulary over the test sentences."""
    import torch
    import transformers
    path = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w.strip(".,").lower() for s in HYPS + REFS for w in s.split()} - {""})
    pieces = ["##s", "##ing", "##ed", "##ly", ".", ","] + [w[:3] for w in words]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(words + pieces))
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)},
                                     model_max_length=64)
    assert "[UNK]" not in tok.tokenize(" ".join(HYPS + REFS))
    tok.save_pretrained(str(path))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _package(path, hyps, refs, *, layer, idf, baseline=None):
    import bert_score
    kw = dict(rescale_with_baseline=True, baseline_path=baseline, lang="en") if baseline else {}
    p, r, f = bert_score.score(hyps, refs, model_type=path, num_layers=layer, idf=idf,
                               device="cpu", nthreads=0, batch_size=4, **kw)
    return np.stack([p.numpy(), r.numpy(), f.numpy()])


def _ours(out):
    return np.stack([out["per_pair"][k] for k in ("precision", "recall", "f1")])


@pytest.mark.parametrize("layer,idf", [(1, False), (3, True)])
def test_bertscore_equals_the_bert_score_package(tiny_bert, idf, layer):
    # bert-score 0.3.13 cannot encode an empty sentence under transformers 5, so the package
    # sees the non-empty pairs; the empty one is checked on its own below.
    keep = [0, 1, 2, 4]
    hyps, refs = [HYPS[i] for i in keep], [REFS[i] for i in keep]
    want = _package(tiny_bert, hyps, refs, layer=layer, idf=idf)
    got = bertscore(hyps, refs, model=tiny_bert, layer=layer, idf=idf, batch_size=4)
    diff = np.abs(_ours(got) - want).max()
    print(f"layer {layer} idf {idf}: max abs(ours - bert-score) = {diff:.2e}")
    np.testing.assert_allclose(_ours(got), want, atol=1e-4)
    assert got["f1"] == pytest.approx(want[2].mean(), abs=1e-4)
    assert np.all(want > 0.05)  # the best matches are positive: padding cannot matter
    with_empty = bertscore(HYPS, REFS, model=tiny_bert, layer=layer, idf=idf)
    assert with_empty["per_pair"]["f1"][3] == 0.0
    if not idf:  # with idf the weights come from all five references
        np.testing.assert_allclose(_ours(with_empty)[:, keep], want, atol=1e-4)


def test_identical_texts_score_one_and_multiple_refs_take_the_best(tiny_bert):
    out = bertscore(REFS, REFS, model=tiny_bert)
    np.testing.assert_allclose(_ours(out)[:, [0, 1, 2, 4]], 1.0, atol=1e-5)
    multi = bertscore(HYPS[:2], [[REFS[1], REFS[0]], [REFS[1]]], model=tiny_bert, layer=2)
    single = [bertscore(HYPS[:1], [r], model=tiny_bert, layer=2) for r in REFS[:2]]
    assert multi["per_pair"]["f1"][0] == pytest.approx(
        max(s["per_pair"]["f1"][0] for s in single), abs=1e-6)


def test_baseline_rescaling_matches_the_package(tiny_bert, tmp_path):
    baseline = tmp_path / "baseline.tsv"
    rows = ["LAYER,P,R,F"] + [f"{k},{0.5 + 0.05 * k},{0.4 + 0.05 * k},{0.45 + 0.05 * k}"
                              for k in range(4)]
    baseline.write_text("\n".join(rows) + "\n")
    hyps, refs = HYPS[:3], REFS[:3]
    want = _package(tiny_bert, hyps, refs, layer=2, idf=False, baseline=str(baseline))
    got = bertscore(hyps, refs, model=tiny_bert, layer=2, rescale_with_baseline=True,
                    baseline=str(baseline))
    np.testing.assert_allclose(_ours(got), want, atol=1e-4)
    same = bertscore(hyps, refs, model=tiny_bert, layer=2, rescale_with_baseline=True,
                     baseline=(0.6, 0.5, 0.55))
    np.testing.assert_allclose(_ours(same), _ours(got), atol=1e-6)
    with pytest.raises(ValueError, match="needs baseline"):
        bertscore(HYPS, REFS, model=tiny_bert, rescale_with_baseline=True)
    with pytest.raises(ValueError, match="layer 9 is out of range 0..3"):
        bertscore(HYPS, REFS, model=tiny_bert, layer=9)


def test_evaluate_generation_scores_every_system_with_bertscore(tiny_bert, monkeypatch):
    """BLEU/ROUGE run in a host thread while the next model generates, BERTScore after: the
    merged metrics equal each metric computed directly."""
    from align_jax.eval import answers as answers_lib
    from align_jax.eval import bleu, rouge
    fixed = {"m0": HYPS, "m1": list(reversed(HYPS))}
    monkeypatch.setattr(answers_lib, "answer_and_score",
                        lambda config, params, tok, sets, score_sets, **kw:
                        ({n: fixed[n] for n in sets}, {}))
    loaded = answers_lib.load_bertscore_model(tiny_bert)
    out = answers_lib.evaluate_generation(
        {"m0": (None, None), "m1": (None, None)}, None,
        [{"prompt": f"q{i}", "completion": r} for i, r in enumerate(REFS)],
        bertscore_model=loaded)
    assert list(out["metrics"]) == ["m0", "m1"]
    for name, hyps in fixed.items():
        m = out["metrics"][name]
        assert m["bleu"] == pytest.approx(bleu(hyps, REFS))
        assert m["rougeL"] == pytest.approx(rouge(hyps, REFS)["rougeL"])
        want = bertscore(hyps, REFS, model=loaded)
        assert m["bertscore_f1"] == pytest.approx(want["f1"], abs=1e-6)
        assert m["bertscore_precision"] == pytest.approx(want["precision"], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A random 4-layer RoBERTa with a byte-level BPE trained on the test sentences: the
    family of the paper's setting (roberta-large, layer 17), small. Two copies of it whose
    tokenizers differ only in add_prefix_space: (True, False)."""
    import shutil

    import tokenizers
    import torch
    import transformers
    root = tmp_path_factory.mktemp("tiny_roberta")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(HYPS + REFS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(root))
    dirs = []
    for prefix in (True, False):
        path = root / f"prefix_{prefix}"
        tok = transformers.RobertaTokenizer(vocab=str(root / "vocab.json"),
                                            merges=str(root / "merges.txt"),
                                            model_max_length=64, add_prefix_space=prefix)
        assert len(tok) > 100 and tok.unk_token_id not in tok.encode(" ".join(HYPS + REFS))
        tok.save_pretrained(str(path))
        dirs.append(str(path))
    config = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                                        num_attention_heads=4, intermediate_size=48,
                                        max_position_embeddings=66, type_vocab_size=1,
                                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    transformers.RobertaModel(config).eval().save_pretrained(dirs[0], safe_serialization=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(f"{dirs[0]}/{f}", f"{dirs[1]}/{f}")
    return tuple(dirs)


@pytest.mark.parametrize("layer,idf", [(2, False), (3, True)])
def test_roberta_at_a_chosen_layer_equals_the_bert_score_package(tiny_roberta, layer, idf):
    """The paper's setting is RoBERTa at an inner layer (bert-score's default for English).
    bert-score encodes a RoBERTa sentence with add_prefix_space=True; under transformers 5 the
    tokenizer ignores that argument of encode, so the package gets the prefix space only from
    a tokenizer saved with it (the first copy). Ours adds it whatever the tokenizer says."""
    from align_jax.eval.bertscore import PAPER_SETTING, sentence_ids
    from align_jax.tokenizer import load_tokenizer
    assert PAPER_SETTING == {"model": "roberta-large", "layer": 17,
                             "rescale_with_baseline": False}
    with_prefix, without = tiny_roberta
    keep = [0, 1, 2, 4]
    hyps, refs = [HYPS[i] for i in keep], [REFS[i] for i in keep]
    want = _package(with_prefix, hyps, refs, layer=layer, idf=idf)
    for path in tiny_roberta:
        got = bertscore(hyps, refs, model=path, layer=layer, idf=idf, batch_size=4)
        print(f"roberta layer {layer} idf {idf}: max abs(ours - bert-score) = "
              f"{np.abs(_ours(got) - want).max():.2e}")
        # float32 encoders on both sides, summed in different orders: 1e-4 as for BERT above.
        np.testing.assert_allclose(_ours(got), want, atol=1e-4)
        assert got["layer"] == layer and got["model"] == path and not got["rescaled"]
    # The prefix space matters: without it the first word is other tokens and the scores move.
    tok = load_tokenizer(without)
    assert sentence_ids(tok, HYPS[1], model_type="roberta") != sentence_ids(
        tok, HYPS[1], model_type="bert")
    assert np.abs(_package(without, hyps, refs, layer=layer, idf=idf) - want).max() > 1e-3
