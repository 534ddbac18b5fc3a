"""Training objectives: one `Objective` record each, in one registry.

An objective is everything the train entry needs to know about a method:

- its loss, with ONE calling convention for every objective:
  `loss(params, batch, *, config, rng, ref_params, **options) -> (scalar loss, metrics)`;
  `rng` is the microbatch's key and `ref_params` the frozen reference params or None;
- the loss keywords it accepts (`options`), checked when the run starts, before any data is read;
- the records it reads and how they become batches: its `data` format
  (`align_jax.data.formats.DataFormat`: schema, tokenisation kind, batch builders);
- whether it needs a reference model and how that reference is made: `references` lists the
  modes it can use ("precomputed": log-probs computed once over the data by
  `precompute_reference`; "params": a frozen copy of the initial params), the first being its
  default; `uses_reference(options)` says when the options switch it off (reference-free DPO).

Adding an objective (a LoRA variant, the aligner objective, a classifier) is one record and its
loss module; nothing in `train/entry.py`, `data/loaders.py` or `data/sources.py` changes:

    def my_loss(params, batch, *, config, rng, ref_params, beta=0.1):
        ...
        return loss, {"loss": loss, "num_tokens": n}

    register_objective(Objective(name="mine", loss=my_loss, data="sft", options=("beta",)))

then `align-jax train --gin_param="train_main.objective='mine'"` (gin must import the module
that registers it, e.g. via `import my_package.my_objective` in the run's .gin file).
A batch layout of its own is a `DataFormat` given as `data=`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from align_jax.data.formats import DataFormat, get_format
from align_jax.losses.aligner import aligner_loss
from align_jax.losses.dpo import dpo_objective, precompute_ref_logps
from align_jax.losses.kto import kto_objective
from align_jax.losses.sami import sami_objective
from align_jax.losses.sft import lm_loss, sft_loss

REFERENCE_MODES = ("precomputed", "params")
# Passed by the train step, never given as options.
_STEP_ARGS = ("config", "rng", "ref_params")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """One training objective (see the module docstring for the calling convention).

    Attributes:
      name: the name `train_main(objective=...)` takes.
      loss: `loss(params, batch, *, config, rng, ref_params, **options) -> (loss, metrics)`.
        A mean over scored units should report their count (`num_tokens`, `num_pairs` or
        `num_examples`) so gradient accumulation weighs microbatches by it.
      data: the records it trains on: a `DataFormat` or the name of a registered one; None for
        an objective fed by a caller's own iterator (`train(loss_fn=...)`).
      options: the loss keywords a run may set (`train_main.loss_kwargs`); None accepts any
        (not checked).
      references: reference modes it can use, preferred first; () when it needs none.
      uses_reference: options -> whether this run uses the reference (e.g. False for
        reference-free DPO); default: whenever `references` is non-empty.
      precompute_reference: `fn(config, params, batch, *, vocab_chunk_size) -> [B, K]` the
        reference log-probs of a padded batch of `data`, attached to each example as
        `ref_logps` (the "precomputed" mode); required when "precomputed" is in `references`.
    """
    name: str
    loss: Callable[..., tuple[Any, Mapping[str, Any]]]
    data: str | DataFormat | None = None
    options: tuple[str, ...] | None = ()
    references: tuple[str, ...] = ()
    uses_reference: Callable[[Mapping[str, Any]], bool] | None = None
    precompute_reference: Callable[..., Any] | None = None

    def __post_init__(self):
        bad = [m for m in self.references if m not in REFERENCE_MODES]
        if bad:
            raise ValueError(f"objective {self.name!r}: unknown reference modes {bad}; "
                             f"choose from {REFERENCE_MODES}")
        if "precomputed" in self.references and self.precompute_reference is None:
            raise ValueError(f"objective {self.name!r}: the 'precomputed' reference needs "
                             "precompute_reference")

    @property
    def data_format(self) -> DataFormat:
        if self.data is None:
            raise ValueError(f"objective {self.name!r} has no data format")
        return get_format(self.data)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options as a dict; raises ValueError naming the objective and a key it does
        not take."""
        options = dict(options)
        for key in options:
            if key in _STEP_ARGS:
                raise ValueError(f"objective {self.name!r}: loss keyword {key!r} is passed by "
                                 "the train step, not set in loss_kwargs")
            if self.options is not None and key not in self.options:
                raise ValueError(f"objective {self.name!r}: unknown loss keyword {key!r}; it "
                                 f"takes {sorted(self.options)}")
        return options

    def reference_mode(self, requested: str, options: Mapping[str, Any]) -> str:
        """"none", "precomputed" or "params": the reference this run uses, given the mode the
        run asks for (an objective that cannot use it takes its own preferred mode)."""
        if requested not in REFERENCE_MODES:
            raise ValueError(f"reference={requested!r}: choose one of {REFERENCE_MODES}")
        if not self.references:
            return "none"
        if self.uses_reference is not None and not self.uses_reference(options):
            return "none"
        return requested if requested in self.references else self.references[0]

    def bind(self, *, config: Any, options: Mapping[str, Any] | None = None) -> Callable:
        """The step's loss: `loss(params, batch, *, rng, ref_params) -> (loss, metrics)`."""
        options = self.check_options(options or {})
        takes_params = "params" in self.references
        name, fn = self.name, self.loss

        def loss(params, batch, *, rng, ref_params):
            if ref_params is not None and not takes_params:
                raise TypeError(f"objective {name!r}: the run keeps frozen reference params "
                                "(ref_params) but the objective takes no 'params' reference")
            return fn(params, batch, config=config, rng=rng, ref_params=ref_params, **options)

        return loss


def as_objective(loss: Objective | Callable) -> Objective:
    """An Objective as is; a bare loss function (same calling convention) as an objective that
    accepts any options and a "params" reference."""
    if isinstance(loss, Objective):
        return loss
    return Objective(name=getattr(loss, "__name__", repr(loss)), loss=loss, options=None,
                     references=("params",))


def _options(fn: Callable) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(fn).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n not in _STEP_ARGS)


def _adapt(fn: Callable, *, ref: bool) -> Callable:
    """`fn(params, batch, *, config, [ref_params,] **options)` in the one calling convention."""
    if ref:
        def loss(params, batch, *, config, rng, ref_params, **options):
            del rng
            return fn(params, batch, config=config, ref_params=ref_params, **options)
    else:
        def loss(params, batch, *, config, rng, ref_params, **options):
            del rng, ref_params
            return fn(params, batch, config=config, **options)
    loss.__name__ = fn.__name__
    loss.__doc__ = fn.__doc__
    return loss


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Adds an objective under its name; re-registering the same record is a no-op."""
    if OBJECTIVES.get(objective.name, objective) != objective:
        raise ValueError(f"objective {objective.name!r} is already registered")
    if objective.data is not None:
        get_format(objective.data)  # an unknown format name fails here, not at run time
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str | Objective) -> Objective:
    """The registered objective `name` (an Objective is returned as is)."""
    if isinstance(name, Objective):
        return name
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r}: choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def _dpo_uses_reference(options: Mapping[str, Any]) -> bool:
    return not (options.get("reference_free") or options.get("loss_type") == "simpo")


register_objective(Objective(name="sft", loss=_adapt(sft_loss, ref=False), data="sft",
                             options=_options(sft_loss)))
# Raw text: the c-fine-tuned baseline.
register_objective(Objective(name="lm", loss=_adapt(lm_loss, ref=False), data="lm",
                             options=_options(lm_loss)))
register_objective(Objective(
    name="dpo", loss=_adapt(dpo_objective, ref=True), data="preference",
    options=_options(dpo_objective), references=("precomputed", "params"),
    uses_reference=_dpo_uses_reference, precompute_reference=precompute_ref_logps))
# KTO's KL pairs are formed within each batch, so their reference values cannot be computed
# ahead of the shuffled order: frozen params only.
register_objective(Objective(name="kto", loss=_adapt(kto_objective, ref=True), data="kto",
                             options=_options(kto_objective), references=("params",)))
# SAMI's optional KL regulariser compares with the frozen initial params.
register_objective(Objective(name="sami", loss=_adapt(sami_objective, ref=True), data="sami",
                             options=_options(sami_objective), references=("params",),
                             uses_reference=lambda o: bool(o.get("kl_coef"))))
# Aligners: next-token NLL on `[INPUT] x [INIT] y [ALIGNED] y' [DONE]`, scored on y', [DONE].
register_objective(Objective(name="aligner", loss=_adapt(aligner_loss, ref=False),
                             data="aligner", options=_options(aligner_loss)))
