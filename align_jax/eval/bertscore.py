"""BERTScore with align_jax's own encoder, following the `bert-score` package's conventions.

Each sentence is encoded once ([CLS] text [SEP], stripped, truncated to the encoder's
length; a RoBERTa sentence with a space before it, as bert-score's add_prefix_space) and its
contextual token embeddings at `layer` are taken (layer k = the output of the k-th layer,
0 = the embeddings; default the last layer). For a pair, every hypothesis
token is matched to its most cosine-similar reference token (precision) and every reference
token to its most similar hypothesis token (recall); the matches are averaged with weights
that are 0 for [CLS] and [SEP] (they still take part as match candidates, as in bert-score)
and 1 or, with `idf`, the token's inverse document frequency over the references:
log((M + 1) / (df + 1)), M references, df how many contain the token (unseen tokens get
log(M + 1)). F1 = 2PR / (P + R). An empty sentence scores 0. With baseline rescaling each
score s becomes (s - b) / (1 - b).

Which model and layer: the value-alignment paper's BERTScores (0.91-0.93) are bert-score's
default for English, roberta-large at layer 17 without baseline rescaling (`PAPER_SETTING`);
any setting's absolute scale differs (all-MiniLM-L6-v2's last layer, the demo's small encoder,
gives 0.40-0.45 on the same kind of text), so only scores of one model and layer compare.

One difference from the package, by design: bert-score pads a batch with zero similarities
that can win a token's max when every real similarity of that token is negative, so its
result can depend on which sentences share a batch. Here padding never matches; the two
agree whenever each token's best match is non-negative, which contextual embeddings give in
practice (the test checks it on its inputs).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.tokenizer import load_tokenizer

_PAD = 8
# bert-score's default for English (its model2layers): the setting of the value-alignment
# paper's BERTScore column.
PAPER_SETTING = {"model": "roberta-large", "layer": 17, "rescale_with_baseline": False}


@jax.jit
def _greedy(hyp_BTD, hyp_w_BT, hyp_m_BT, ref_BSD, ref_w_BS, ref_m_BS):
    """Idf-weighted greedy cosine matching -> (P_B, R_B, F_B), float32."""
    h = hyp_BTD.astype(jnp.float32)
    r = ref_BSD.astype(jnp.float32)
    h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    r = r / jnp.maximum(jnp.linalg.norm(r, axis=-1, keepdims=True), 1e-12)
    sim_BTS = jnp.einsum("BTD,BSD->BTS", h, r)
    pair_BTS = hyp_m_BT[:, :, None] & ref_m_BS[:, None, :]
    sim_BTS = jnp.where(pair_BTS, sim_BTS, -jnp.inf)
    best_BT = jnp.where(hyp_m_BT, sim_BTS.max(axis=2), 0.0)
    best_BS = jnp.where(ref_m_BS, sim_BTS.max(axis=1), 0.0)
    hw, rw = hyp_w_BT.sum(-1), ref_w_BS.sum(-1)
    p = jnp.where(hw > 0, (best_BT * hyp_w_BT).sum(-1) / jnp.where(hw > 0, hw, 1.0), 0.0)
    r = jnp.where(rw > 0, (best_BS * ref_w_BS).sum(-1) / jnp.where(rw > 0, rw, 1.0), 0.0)
    # A sentence with no real token ([CLS][SEP] only) scores 0, as in bert-score.
    empty = (hyp_m_BT.sum(-1) <= 2) | (ref_m_BS.sum(-1) <= 2)
    p, r = jnp.where(empty, 0.0, p), jnp.where(empty, 0.0, r)
    f = jnp.where(p + r > 0, 2 * p * r / jnp.where(p + r > 0, p + r, 1.0), 0.0)
    return p, r, f


def _load(model):
    if isinstance(model, (str, os.PathLike)):
        return _load_path(os.fspath(model))
    if not isinstance(model, tuple) or len(model) != 3:
        raise TypeError("bertscore(model=...): give an encoder checkpoint dir or a "
                        "(EncoderConfig, params, tokenizer) tuple")
    return model


@functools.lru_cache(maxsize=2)
def _load_path(path: str):
    # Local: `import align_jax.eval` (metrics, MI bound) stays free of flax and the models.
    from align_jax.models.encoder import load_encoder
    config, params = load_encoder(path)
    return config, params, load_tokenizer(path)


def _pad_to(n: int) -> int:
    # Powers of two (from 8): a handful of compiled shapes whatever the sentence lengths.
    return max(_PAD, 1 << max(0, n - 1).bit_length())


def _rows(n: int, batch_size: int) -> int:
    # Rows padded to a power of two (at most batch_size): few compiled shapes, little waste.
    return min(batch_size, 1 << max(0, n - 1).bit_length())


def sentence_ids(tokenizer, text: str, *, model_type: str = "bert",
                 max_length: int | None = None) -> list[int]:
    """A sentence's encoder ids as bert-score makes them: stripped, with the special tokens,
    truncated; RoBERTa's byte-level BPE sees a space before the first word (add_prefix_space),
    so the first word is encoded as it is inside a sentence."""
    text = text.strip()
    if model_type == "roberta" and text:
        text = " " + text
    return tokenizer.encode_pair(text, max_length=max_length)[0]


def _embed_all(config, params, tokenizer, texts, *, layer, batch_size, max_length):
    """Per unique text: (ids, embeddings [len, D] float32 numpy)."""
    from align_jax.models.encoder import encode  # local: see _load_path
    ids = {t: sentence_ids(tokenizer, t, model_type=config.model_type, max_length=max_length)
           for t in texts}
    order = sorted(ids, key=lambda t: -len(ids[t]))  # similar lengths share a batch
    out = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        t, b = _pad_to(max(len(ids[s]) for s in chunk)), _rows(len(chunk), batch_size)
        tokens = np.full((b, t), config.pad_token_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        for i, s in enumerate(chunk):
            tokens[i, :len(ids[s])], mask[i, :len(ids[s])] = ids[s], 1
        hidden = np.asarray(encode(config, params, tokens, attention_mask_BT=mask,
                                   output_layer=layer), np.float32)
        for i, s in enumerate(chunk):
            out[s] = (ids[s], hidden[i, :len(ids[s])])
    return out


def idf_weights(refs: Sequence[str], tokenizer, *, max_length: int | None = None,
                model_type: str = "bert") -> tuple[dict[int, float], float]:
    """Inverse document frequency of token ids over the references.

    Returns:
      ({token id: log((M + 1) / (df + 1))}, the weight of unseen ids log(M + 1)).
    """
    m = len(refs)
    df = Counter()
    for r in refs:
        df.update(set(sentence_ids(tokenizer, r, model_type=model_type, max_length=max_length)))
    return {i: float(np.log((m + 1) / (c + 1))) for i, c in df.items()}, float(np.log(m + 1))


def _rescale(scores, baseline, layer):
    if isinstance(baseline, (str, os.PathLike)):
        # bert-score's baseline file: a header "LAYER,P,R,F", then one row per layer.
        rows = [line.split(",") for line in open(baseline).read().splitlines()[1:] if line]
        if not 0 <= layer < len(rows):
            raise ValueError(f"{baseline}: no baseline row for layer {layer}")
        baseline = tuple(float(x) for x in rows[layer][1:4])
    if len(baseline) != 3:
        raise ValueError("baseline: expected (P, R, F) or a bert-score baseline file")
    return [(s - b) / (1 - b) for s, b in zip(scores, baseline)]


def bertscore(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], *, model,
              layer: int | None = None, idf: bool = False, rescale_with_baseline: bool = False,
              baseline=None, batch_size: int = 64, max_length: int | None = None) -> dict:
    """BERTScore precision, recall and F1 of each hypothesis against its reference(s).

    Args:
      hyps: generated answers.
      refs: one reference per answer, or a list of them (each score is the best over the
        references, per component, as bert-score does).
      model: an encoder checkpoint dir (BERT or RoBERTa family; the paper's setting is a
        roberta-large dir at layer 17, `PAPER_SETTING`), or (EncoderConfig, params, tokenizer).
      layer: hidden layer to use (0 = embeddings); default the last.
      idf: weight tokens by inverse document frequency over the references.
      rescale_with_baseline: rescale with `baseline`.
      baseline: (P, R, F) baselines, or a bert-score baseline file (row `layer`).
      batch_size: sentences per encoder forward and pairs per matching step.
      max_length: truncation; default the encoder's position table (512 for BERT and RoBERTa).
    Returns:
      {"precision", "recall", "f1": means, "per_pair": {"precision", "recall", "f1": [N]
      float32 arrays}, "model": the checkpoint (its path, or "<in-memory encoder>"),
      "layer": the layer used, "idf": idf, "rescaled": rescale_with_baseline}.
    """
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<in-memory encoder>"
    config, params, tokenizer = _load(model)
    if len(hyps) != len(refs):
        raise ValueError(f"bertscore: {len(hyps)} hypotheses but {len(refs)} references")
    layer = config.num_layers if layer is None else int(layer)
    if not 0 <= layer <= config.num_layers:
        raise ValueError(f"bertscore: layer {layer} is out of range 0..{config.num_layers}")
    if rescale_with_baseline and baseline is None:
        raise ValueError("bertscore: rescale_with_baseline needs baseline=(P, R, F) or a file")
    # The position table's length, as bert-score's tokenizer.model_max_length (not a
    # sentence-transformers max_seq_length).
    max_length = max_length or config.max_positions - config.position_offset
    groups = [[r] if isinstance(r, str) else list(r) for r in refs]
    flat_h = [h for h, g in zip(hyps, groups) for _ in g]
    flat_r = [r for g in groups for r in g]
    n = len(flat_h)
    if n == 0:
        empty = np.zeros(0, np.float32)
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan"),
                "per_pair": {"precision": empty, "recall": empty, "f1": empty},
                "model": name, "layer": layer, "idf": idf, "rescaled": rescale_with_baseline}
    emb = _embed_all(config, params, tokenizer, set(flat_h) | set(flat_r), layer=layer,
                     batch_size=batch_size, max_length=max_length)
    weights, unseen = (idf_weights(flat_r, tokenizer, max_length=max_length,
                                   model_type=config.model_type) if idf else ({}, 1.0))

    def weight(ids):
        w = np.array([weights.get(i, unseen) for i in ids], np.float32)
        w[0] = w[-1] = 0.0  # [CLS] and [SEP]
        return w

    def stack(texts):
        t, b = _pad_to(max(len(emb[s][0]) for s in texts)), _rows(len(texts), batch_size)
        x = np.zeros((b, t, config.embed_dim), np.float32)
        w = np.zeros((b, t), np.float32)
        m = np.zeros((b, t), bool)
        for i, s in enumerate(texts):
            ids, e = emb[s]
            x[i, :len(ids)], w[i, :len(ids)], m[i, :len(ids)] = e, weight(ids), True
        return x, w, m

    p, r, f = (np.zeros(n, np.float32) for _ in range(3))
    # Pairs sorted by length so a batch pads little; results go back to their places.
    order = sorted(range(n), key=lambda i: -(len(emb[flat_h[i]][0]) + len(emb[flat_r[i]][0])))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        out = _greedy(*stack([flat_h[i] for i in idx]), *stack([flat_r[i] for i in idx]))
        for arr, val in zip((p, r, f), out):
            arr[idx] = np.asarray(val)[:len(idx)]
    if rescale_with_baseline:
        p, r, f = _rescale((p, r, f), baseline, layer)
    bounds = np.cumsum([0] + [len(g) for g in groups])
    p, r, f = (np.array([a[b:e].max() for b, e in zip(bounds[:-1], bounds[1:])], np.float32)
               for a in (p, r, f))
    return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean()),
            "per_pair": {"precision": p, "recall": r, "f1": f}, "model": name, "layer": layer,
            "idf": idf, "rescaled": rescale_with_baseline}
