"""Classification cross-entropy and accuracy against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import losses


def _np_ce(logits, labels):
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return lse - x[np.arange(len(labels)), labels]


def test_classification_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32) * 4
    labels = rng.integers(0, 3, size=6).astype(np.int32)
    loss, metrics = losses.classification_loss(jnp.asarray(logits, jnp.bfloat16),
                                                jnp.asarray(labels))
    ref_logits = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, _np_ce(ref_logits, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"],
                               (ref_logits.argmax(1) == labels).mean())


def test_ignored_rows_and_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 2)).astype(np.float32)
    labels = np.array([1, -1, 0, 1], np.int32)
    (loss, metrics), g = jax.value_and_grad(
        lambda x: losses.classification_loss(x, jnp.asarray(labels)), has_aux=True)(
            jnp.asarray(logits))
    keep = labels >= 0
    np.testing.assert_allclose(loss, _np_ce(logits[keep], labels[keep]).mean(), rtol=1e-5)
    assert float(metrics["num_examples"]) == 3
    g = np.asarray(g)
    assert np.all(g[1] == 0.0)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(g[0], (p - np.eye(2)[1]) / 3, rtol=1e-5)
    with pytest.raises(ValueError, match="logits"):
        losses.classification_loss(jnp.zeros((4, 2)), jnp.zeros((3,), jnp.int32))


def test_classification_objective_with_any_apply_fn():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 20, size=(5, 7)).astype(np.int32)
    labels = rng.integers(0, 2, size=5).astype(np.int32)
    params = {"emb": jnp.asarray(rng.normal(size=(20, 2)), jnp.float32)}

    def apply_fn(p, batch):  # bag-of-tokens classifier, stands in for the encoder
        return jnp.take(p["emb"], batch["tokens"], axis=0).mean(1)

    batch = {"tokens": tokens, "labels": labels}
    loss, metrics = losses.classification_objective(params, batch, apply_fn=apply_fn)
    logits = np.asarray(params["emb"])[tokens].mean(1)
    np.testing.assert_allclose(loss, _np_ce(logits, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(1) == labels).mean())
    with pytest.raises(KeyError, match="'labels'"):
        losses.classification_objective(params, {"tokens": tokens}, apply_fn=apply_fn)
