"""The aligner SDG's optional similarity filter on encoder sentence embeddings."""

import numpy as np

from align_jax.methods.inspectors import build_tiny_encoder
from align_jax.models import encoder
from align_jax.sdg.aligner_data import similar_by_embedding
from align_jax.tokenizer import load_tokenizer


def test_similar_by_embedding_drops_cosine_at_or_above_threshold(tmp_path):
    texts = ["how do i fix my bike", "is the shop open on sunday", "how do i fix my bike",
             "can you help me with a repair", "sunday shop open"]
    enc = build_tiny_encoder(texts, str(tmp_path / "enc"), max_length=32)
    config, params = encoder.load_encoder(enc)
    emb = encoder.embed_sentences(config, params, load_tokenizer(enc), texts)
    cos = emb @ emb.T
    threshold = float(np.median(cos[np.triu_indices(len(texts), 1)]))
    expected, kept = [], []
    for i in range(len(texts)):
        ok = all(cos[i, j] < threshold for j in kept)
        expected.append(ok)
        kept += [i] if ok else []
    assert similar_by_embedding(texts, enc, threshold=threshold) == expected
    keep = similar_by_embedding(texts, enc, threshold=0.9999)
    assert keep[2] is False and keep[0] is True  # the exact repeat goes


def test_aligner_triples_filtered_by_the_cosine_of_y_and_y_aligned(tmp_path):
    """The reference code's filter: drop a triple when cosine(embed(y), embed(y')) >= the
    threshold; with an encoder it replaces the difflib ratio."""
    from test_stages import FunctionTeacher, _reasons

    from align_jax.sdg import aligner_data
    pairs = [("Water boils at 50 degrees.", "Water boils at 100 degrees at sea level."),
             ("You are stupid for asking.", "That is a fair question; here is the answer."),
             ("Spend less.", "Spend less money."),
             ("I will not help.", "Here are three steps that help: plan, save, review."),
             ("The shop opens at nine.", "The shop opens at nine on weekdays.")]
    texts = [t for p in pairs for t in p]
    enc = build_tiny_encoder(texts + ["question"], str(tmp_path / "enc"), max_length=32)
    config, params = encoder.load_encoder(enc)
    emb = encoder.embed_sentences(config, params, load_tokenizer(enc), texts)
    cos = np.array([emb[2 * i] @ emb[2 * i + 1] for i in range(len(pairs))])
    np.testing.assert_allclose(aligner_data.rewrite_cosines([p[0] for p in pairs],
                                                            [p[1] for p in pairs], enc),
                               cos, rtol=1e-5, atol=1e-6)
    threshold = float(np.median(cos))
    questions = [{"question": f"Question number {i} here?",
                  "question_id": aligner_data.question_id(f"q{i}")} for i in range(len(pairs))]

    def fn(role, prompt):
        i = int(prompt.split("Question number ")[-1].split()[0])
        return f"{pairs[i][0]}\nCritique: It needs fixing.\nAligned response: {pairs[i][1]}"

    cfg = aligner_data.AlignerDataConfig(rewrite_encoder=enc, max_rewrite_cosine=threshold,
                                         max_rewrite_similarity=0.0)
    results = aligner_data.generate_aligner(FunctionTeacher(fn), questions,
                                            criterion="helpful", seed=0, config=cfg)
    kept = [bool(r.records.get("aligner")) for r in results]
    assert kept == [bool(c < threshold) for c in cos]
    assert _reasons(results) == {"similar_rewrite_embedding": int(np.sum(cos >= threshold))}
    assert 0 < sum(kept) < len(pairs)
    # The same split on ready-made triples (the recipe's option).
    triples = [{"input": q["question"], "initial_response": y, "critique": "c",
                "aligned_response": y2, "criterion": "helpful"}
               for q, (y, y2) in zip(questions, pairs)]
    keep, dropped = aligner_data.filter_rewrites(triples, enc, max_cosine=threshold)
    assert [t["aligned_response"] for t in keep] == [p[1] for p, k in zip(pairs, kept) if k]
    assert all(d["cosine"] >= threshold for d in dropped)
