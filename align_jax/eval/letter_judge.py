"""A local judge read from its probabilities of the letters "A" and "B", not its text.

Asked to write a verdict, a small judge (a few hundred million parameters) answers "A"
whatever it is shown: its win rates are 0.5 and its position bias 1. Its next-token
probabilities still move with the two responses. This judge renders the same pairwise
template, runs one forward pass per judgement through the shared scorer
(`align_jax.losses.scorer`), and reports

    p = P("A") / (P("A") + P("B"))

for the token that opens the answer. `eval.judge.win_rate_matrix` turns p into soft scores
(system A's score is p in order A|B and 1 - p in order B|A), so a judge that favours one slot
by a constant amount cancels out of the pair score; the report still states that slot
preference as the position bias. This is the probability-weighted verdict that
AlpacaEval-style evaluators read from API log-probs, computed here on the local model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from align_jax.data import batching
from align_jax.data.formatting import Example
from align_jax.losses.logprobs import forward_token_logps
from align_jax.losses.scorer import bind, score_examples
from align_jax.models.hf import load_hf
from align_jax.models.named import resolve_model_path
from align_jax.tokenizer import encode_prompt, load_tokenizer


def _letter_logps(config, params, batch):
    logps, _ = forward_token_logps(config, params, batch, where="LetterJudge")
    return logps.sum(-1)  # [B, 2]: log P(A | x), log P(B | x)


class LetterJudge:
    """A local checkpoint as a judge of pairwise templates, through P("A") vs P("B").

    Attributes:
      name: the checkpoint (for reports).
      context_length: the longest judgement prompt, in tokens.
    """

    def __init__(self, model, *, seq_len: int = 2048, batch_size: int = 8, mesh=None,
                 rules: str = "fsdp", dtype: str = "float32"):
        """Loads the judge.

        Args:
          model: a Hugging Face checkpoint dir, a named default ('smollm2-135m-instruct')
            or a .gguf file; or a (config, params, tokenizer) tuple.
          seq_len: the longest prompt scored; longer ones are cut on the left (the
            question at the end of the template stays).
          batch_size: judgements per forward.
          mesh: a device mesh to score over (a model loaded here is placed on it with the
            `rules` preset, like the policy), or None.
          rules: the sharding preset of a model loaded from a path.
          dtype: the judge's parameter dtype when loaded from a path.
        """
        if isinstance(model, tuple):
            self.config, self.params, self.tokenizer = model
            self.name = "judge"
        else:
            self.name = str(model)
            path = resolve_model_path(str(model))
            self.config, self.params = load_hf(path, dtype=jnp.dtype(dtype), mesh=mesh,
                                               rules=rules)
            self.tokenizer = load_tokenizer(path)
        self.context_length = seq_len
        self.batch_size = batch_size
        self.mesh = mesh
        self.letter_ids = tuple(self._letter_id(c) for c in "AB")

    def _letter_id(self, letter: str) -> int:
        ids = list(self.tokenizer.encode(letter))
        if len(ids) != 1:
            raise ValueError(f"judge {self.name}: the letter {letter!r} is {len(ids)} tokens "
                             f"({ids}) in its tokenizer; a letter judge needs one token each")
        return ids[0]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def letter_probabilities(self, prompts: Sequence[str], *, use_chat: bool = True
                             ) -> np.ndarray:
        """P("A") / (P("A") + P("B")) as the first answer token, per rendered prompt.

        Args:
          prompts: rendered judge templates (one user turn each).
          use_chat: apply the judge's chat template (True) or score the raw text.
        Returns:
          float64 array [len(prompts)].
        """
        a, b = self.letter_ids
        examples = []
        for p in prompts:
            ids = encode_prompt(self.tokenizer, p, chat_template=use_chat)
            ids = np.asarray(ids[-(self.context_length - 1):], np.int32)
            examples.append(Example(prompt=ids, completions=(np.array([a], np.int32),
                                                             np.array([b], np.int32))))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        logps = score_examples(bind(_letter_logps, self.config), self.params, examples,
                               build=batching.pad_pair_batch, seq_len=self.context_length,
                               batch_size=self.batch_size, pad_id=pad, mesh=self.mesh)
        logps = np.asarray(logps, np.float64).reshape(len(examples), 2)
        return 1.0 / (1.0 + np.exp(logps[:, 1] - logps[:, 0]))


__all__ = ["LetterJudge"]
