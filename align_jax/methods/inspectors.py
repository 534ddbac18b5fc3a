"""Inspectors: one binary encoder classifier per criterion, P(aligned | input, response).

Trained from any BERT-family checkpoint (all-MiniLM-L6-v2 by default in the recipes) on
inspector records (`input`, `response`, `label` 1 = aligned, `criterion`). As in the paper the
classifier reads the question-answer pair: `[CLS] input [SEP] response [SEP]`. Training goes
through the project's train step (`train.step.train_step`, jitted once with donated state by
`train.compile`) with `losses.classification_objective`; the result is saved as a Hugging Face
BertForSequenceClassification dir with its tokenizer, plus held-out accuracy, ROC-AUC,
expected calibration error and a reliability plot.
"""

import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import losses, sharding
from align_jax.models import encoder
from align_jax.tokenizer import copy_tokenizer_files, load_tokenizer
from align_jax.train import compile as compile_lib
from align_jax.train import state as state_lib
from align_jax.train.optim import OptimizerConfig, make_optimizer


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); nan with one class."""
    y, s = np.asarray(labels, bool), np.asarray(scores, np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration(labels: Sequence[int], scores: Sequence[float], *, num_bins: int = 10):
    """Expected calibration error over equal-width bins of P(aligned), and the bins.

    Returns:
      (ece, [{"low", "high", "count", "mean_score", "fraction_aligned"}, ...]).
    """
    y, s = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    idx = np.clip(np.digitize(s, edges[1:-1], right=False), 0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        m = idx == b
        if not m.any():
            continue
        conf, acc = float(s[m].mean()), float(y[m].mean())
        ece += m.sum() / max(len(s), 1) * abs(conf - acc)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(m.sum()),
                     "mean_score": conf, "fraction_aligned": acc})
    return float(ece), bins


def _reliability_plot(bins, path: str, title: str) -> None:
    from align_jax.eval.plots import subplots  # matplotlib: only plots need it
    fig, ax = subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.plot([b["mean_score"] for b in bins], [b["fraction_aligned"] for b in bins], "o-",
            label="inspector")
    ax.set_xlabel("mean P(aligned) in bin")
    ax.set_ylabel("fraction aligned")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _pad(x, rows: int, length: int, fill: int = 0) -> np.ndarray:
    """x [b, t] padded to [rows, length] (b <= rows, t <= length) with `fill`."""
    return np.pad(x, ((0, rows - x.shape[0]), (0, length - x.shape[1])), constant_values=fill)


def _batches(tok, rows, *, max_length, batch_size, length):
    """Fixed-shape batches [batch_size, length]; missing rows get label -1 (ignored)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens, mask, types = encoder.tokenize_batch(
            tok, [r["input"] for r in chunk], [r["response"] for r in chunk],
            max_length=max_length, pad_to_multiple=length)
        labels = np.full((batch_size,), -1, np.int32)
        labels[:len(chunk)] = [int(r["label"]) for r in chunk]
        yield {"tokens": _pad(tokens, batch_size, length, tok.pad_id or 0),
               "attention_mask": _pad(mask, batch_size, length),
               "token_type_ids": _pad(types, batch_size, length), "labels": labels}


def _apply(config, params, batch):
    return encoder.classifier_logits(config, params, batch["tokens"], batch["attention_mask"],
                                     batch["token_type_ids"])


def score_pairs(config, params, tok, inputs: Sequence[str], responses: Sequence[str], *,
                batch_size: int = 32, max_length: int | None = None) -> np.ndarray:
    """P(aligned) = softmax(logits)[:, 1] for each (input, response) pair.

    Every batch is padded to `batch_size` rows and to a power-of-two length (at least 16, at
    most max_length), so scoring any number of rows compiles one classifier per length bucket
    (the squad re-scores after every stage; held-out evaluation scores a few rows).
    """
    out = []
    max_length = max_length or config.max_length
    for start in range(0, len(inputs), batch_size):
        tokens, mask, types = encoder.tokenize_batch(
            tok, list(inputs[start:start + batch_size]), list(responses[start:start + batch_size]),
            max_length=max_length)
        n, t = tokens.shape
        length = max(t, min(max(16, 1 << (t - 1).bit_length()), max_length))
        logits = encoder.classify(config, params, _pad(tokens, batch_size, length, tok.pad_id or 0),
                                  attention_mask_BT=_pad(mask, batch_size, length),
                                  token_type_ids_BT=_pad(types, batch_size, length))
        out.append(np.asarray(jax.nn.softmax(logits, axis=-1)[:n, 1]))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def make_inspector(path: str, *, batch_size: int = 32):
    """A squad inspector from a saved classifier dir: callable(inputs, responses) -> scores."""
    config, params = encoder.load_encoder(path)
    tok = load_tokenizer(path)
    return functools.partial(score_pairs, config, params, tok, batch_size=batch_size)


def build_tiny_encoder(texts: Sequence[str], out_dir: str, *, embed_dim: int = 32,
                       num_layers: int = 2, num_heads: int = 4, max_length: int = 128,
                       seed: int = 0) -> str:
    """A small random BERT with a word-level WordPiece vocabulary of `texts` (tiny runs, tests).

    Nothing is downloaded: the vocabulary is every lower-cased word and punctuation mark of
    `texts` plus BERT's five special tokens. Written as a checkpoint dir (config.json,
    model.safetensors, tokenizer files) that `encoder.load_encoder` and transformers read.
    Returns out_dir (reused when it already holds a model).
    """
    import tokenizers  # heavy: only building a tiny test encoder needs them
    import transformers
    from tokenizers import models, normalizers, pre_tokenizers, processors

    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts
                    for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tk = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)},
                                               unk_token="[UNK]"))
    tk.normalizer, tk.pre_tokenizer = normalizer, splitter
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    os.makedirs(out_dir, exist_ok=True)
    transformers.BertTokenizerFast(tokenizer_object=tk, model_max_length=max_length
                                   ).save_pretrained(out_dir)
    config = encoder.EncoderConfig(vocab_size=len(vocab), embed_dim=embed_dim,
                                   num_layers=num_layers, num_heads=num_heads,
                                   mlp_dim=2 * embed_dim, max_positions=max_length,
                                   max_length=max_length)
    encoder.save_encoder(config, encoder.init_encoder(config, jax.random.PRNGKey(seed),
                                                     optimize=False), out_dir)
    return out_dir


@functools.lru_cache(maxsize=4)
def _trainer(config: encoder.EncoderConfig, *, learning_rate: float, weight_decay: float,
             num_steps: int, mesh, rules):
    """(optimizer, state shardings, jitted train step) of an inspector run. Cached: the recipe
    fine-tunes one inspector per criterion from the same encoder with the same settings, and
    one step function compiles once for all of them."""
    tx, schedule = make_optimizer(OptimizerConfig(
        learning_rate=learning_rate, schedule="linear", weight_decay=weight_decay),
        num_steps=num_steps)
    apply_fn = functools.partial(_apply, config)

    def loss(params, batch, *, rng, ref_params):  # the train step's calling convention
        del rng, ref_params
        return losses.classification_objective(params, batch, apply_fn=apply_fn)

    abstract = state_lib.abstract_state(encoder.abstract_params(config), tx=tx)
    shardings = state_lib.train_state_shardings(abstract, mesh, rules)
    step = compile_lib.jit_train_step(loss=loss, tx=tx, schedule=schedule, grad_accum=1,
                                      mesh=mesh, rules=rules, state_shardings=shardings)
    return tx, shardings, step


def split_records(records: Sequence[Mapping[str, Any]], *, heldout_fraction: float,
                  seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split that keeps both (x, y) and (x, y') of one input on the same side."""
    inputs = sorted({r["input"] for r in records})
    rng = np.random.default_rng(seed)
    rng.shuffle(inputs)
    n_held = int(round(len(inputs) * heldout_fraction))
    held = set(inputs[:n_held])
    return ([dict(r) for r in records if r["input"] not in held],
            [dict(r) for r in records if r["input"] in held])


def train_inspector(records: Sequence[Mapping[str, Any]], *, encoder_dir: str, output_dir: str,
                    criterion: str | None = None, heldout: Sequence[Mapping] | None = None,
                    heldout_fraction: float = 0.2, num_epochs: int = 4,
                    learning_rate: float = 2e-5, weight_decay: float = 0.01,
                    batch_size: int = 8, max_length: int = 256, seed: int = 0,
                    mesh: sharding.MeshSpec | None = None, rules: str = "dp") -> dict[str, Any]:
    """Fine-tunes an encoder into one criterion's inspector and evaluates it on held-out rows.

    Args:
      records: inspector records; only those of `criterion` are used (all when None).
      encoder_dir: a BERT/RoBERTa checkpoint dir with its tokenizer (a fresh 2-way head is
        added when it has none).
      output_dir: receives the classifier (BertForSequenceClassification) + tokenizer,
        metrics.json and reliability.png.
      criterion: the alignment criterion.
      heldout: held-out records; default a split of `records` by input (heldout_fraction).
      num_epochs, learning_rate, weight_decay, batch_size: the paper's defaults (4, 2e-5,
        0.01, 8) with a linear decay.
      max_length: token budget of a pair.
      seed: split, shuffle and head init.
      mesh, rules: devices; the batch is split over data/fsdp.
    Returns:
      metrics: accuracy, roc_auc, ece, calibration bins, train/held-out sizes, final loss.
    """
    rows = [dict(r) for r in records if criterion is None or r["criterion"] == criterion]
    if not rows:
        raise ValueError(f"train_inspector: no records of criterion {criterion!r}")
    for i, r in enumerate(rows):
        if int(r["label"]) not in (0, 1):
            raise ValueError(f"inspector record {i}: label must be 0 or 1, got {r['label']!r}")
    if heldout is None:
        train_rows, held_rows = split_records(rows, heldout_fraction=heldout_fraction, seed=seed)
    else:
        train_rows = rows
        held_rows = [dict(r) for r in heldout if criterion is None or r["criterion"] == criterion]
    config, params = encoder.load_encoder(encoder_dir, num_labels=2, seed=seed)
    tok = load_tokenizer(encoder_dir)
    mesh_ = sharding.make_mesh(mesh or sharding.MeshSpec())
    shards = mesh_.shape["data"] * mesh_.shape["fsdp"]
    batch_size = -(-batch_size // shards) * shards
    # Batches are padded to the longest pair of every record given (all criteria), so the
    # inspectors of one run share their shapes and, with equal step counts, one compiled step.
    longest = max(len(tok.encode_pair(r["input"], r["response"], max_length=max_length)[0])
                  for r in records)
    length = -(-longest // 8) * 8
    steps_per_epoch = -(-len(train_rows) // batch_size)
    num_steps = max(1, steps_per_epoch * num_epochs)
    tx, shardings, step = _trainer(config, learning_rate=learning_rate,
                                   weight_decay=weight_decay, num_steps=num_steps, mesh=mesh_,
                                   rules=rules)
    params = jax.device_put(params, shardings.params)
    state = compile_lib.init_train_state(params, tx=tx, seed=seed, state_shardings=shardings)
    batch_sharding = compile_lib.batch_shardings(mesh_, rules)
    rng = np.random.default_rng(seed)
    last = {}
    for _ in range(num_epochs):
        order = [train_rows[i] for i in rng.permutation(len(train_rows))]
        for batch in _batches(tok, order, max_length=max_length, batch_size=batch_size,
                              length=length):
            batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, batch_sharding)
            state, last = step(state, batch)
    params = jax.device_get(state.params)
    os.makedirs(output_dir, exist_ok=True)
    encoder.save_encoder(config, params, output_dir)
    copy_tokenizer_files(encoder_dir, output_dir)

    scores = score_pairs(config, params, tok, [r["input"] for r in held_rows],
                         [r["response"] for r in held_rows], max_length=max_length)
    labels = np.asarray([int(r["label"]) for r in held_rows])
    ece, bins = calibration(labels, scores)
    metrics = {
        "criterion": criterion, "train_rows": len(train_rows), "heldout_rows": len(held_rows),
        "steps": num_steps, "final_loss": float(last.get("loss", np.nan)),
        "accuracy": float(np.mean((scores >= 0.5) == labels)) if len(labels) else float("nan"),
        "roc_auc": roc_auc(labels, scores), "ece": ece, "bins": bins,
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    if len(labels):
        _reliability_plot(bins, os.path.join(output_dir, "reliability.png"),
                          f"inspector {criterion or ''} (ECE {ece:.3f})")
    return metrics
