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
