"""The host loop: `train(...)`, called by the gin entry `train.entry.train_main` (and by users).

Read top to bottom: resolve the model and its initial params; build the state abstractly and
derive its shardings; restore the latest checkpoint or init; then step. The loop dispatches
step n+1 before it reads step n's metrics, so the host never waits on the device except at
checkpoints; a non-finite loss stops the run (the last good checkpoint stays on disk); SIGTERM
(how a TPU VM is preempted) sets a flag, and the loop saves and returns cleanly.
"""

import contextlib
import dataclasses
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from align_jax import distributed, interrupts, sharding
from align_jax.atomic import atomic_dir
from align_jax.losses import objectives
from align_jax.models import lora as lora_lib
from align_jax.models import transformer
from align_jax.models.config import ModelConfig, get_config
from align_jax.models.hf import load_hf, save_hf
from align_jax.runinfo import write_run_info
from align_jax.tokenizer import copy_tokenizer_files
from align_jax.train import adapters as adapters_lib
from align_jax.train import compile as compile_lib
from align_jax.train import evaluation as evaluation_lib
from align_jax.train.checkpoint import Checkpointer
from align_jax.train.metrics import ExternalLogging, MetricsLogger
from align_jax.train.optim import OptimizerConfig, make_optimizer
from align_jax.train.state import TrainState, abstract_arrays, train_state_shardings

log = logging.getLogger(__name__)

_FINITE_KEYS = ("loss", "grad_norm", "update_norm", "param_norm")
# How the reference model of a reference-based objective (DPO, KTO, SAMI) is made.
REFERENCES = ("none", "precomputed", "params", "adapters_off")


class NonFiniteLossError(FloatingPointError):
    """The loss or a global norm became NaN or infinite; the run stopped without saving it."""


class _Preemption:
    """SIGTERM (how a TPU VM or SLURM preempts) and SIGINT (Ctrl-C) during the step loop are
    recorded (`align_jax.interrupts`), and the loop polls the record between steps, then saves
    a checkpoint and returns. A second Ctrl-C stops at once without waiting for the save.
    Installed on the main thread only."""

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            log.warning("train() is not on the main thread: SIGTERM will not save a checkpoint")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(interrupts.honoured())
        self._stack.enter_context(interrupts.deferred(act=False))
        return self

    @property
    def name(self) -> str | None:
        return interrupts.requested()

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def _shape_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _resolve_model(config: ModelConfig | str | None, params_init: Any, *, mesh, rules
                   ) -> tuple[ModelConfig, Any, bool]:
    """(config, params or None for a random init, whether the params are ours to donate)."""
    if isinstance(config, str):
        config = get_config(config)
    if isinstance(params_init, (str, os.PathLike)):
        # Loaded straight into the sharded layout: a model larger than one device never lands
        # on one device.
        hf_config, params = load_hf(os.fspath(params_init), mesh=mesh, rules=rules)
        return (config or hf_config), params, True
    if config is None:
        raise ValueError("train(): give a `config` (or a Hugging Face dir as `params_init`)")
    return config, params_init, False


def _initial_params(config: ModelConfig, params: Any, *, owned: bool, seed: int, mesh, rules,
                    param_shardings: Any) -> Any:
    """The run's starting params, placed in their shardings (random init never gathers)."""
    if params is None:
        key = jax.random.split(jax.random.key(seed))[1]
        return transformer.init_params(config, key, mesh=mesh, rules=rules)
    want = _shape_tree(jax.tree.map(lambda x: x.value, transformer.abstract_params(config),
                                    is_leaf=lambda x: hasattr(x, "names")))
    got = _shape_tree(params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(
            "train(): params_init does not match the config's parameter tree; "
            f"expected shapes {want}, got {got}")
    dtype = jax.numpy.dtype(config.param_dtype)
    params = jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)
    # The state donates its params to the step: copy what the caller still holds.
    return jax.device_put(params, param_shardings, may_alias=None if owned else False)


def _put_batch(batch: Mapping[str, Any], batch_sharding, num_shards: int) -> dict[str, jax.Array]:
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or (value.shape[0] * jax.process_count()) % num_shards:
            raise ValueError(
                f"batch[{name!r}] has shape {value.shape} on each of {jax.process_count()} "
                f"processes: the global batch axis must be divisible by the {num_shards} batch "
                "shards of the mesh")
        out[name] = jax.make_array_from_process_local_data(batch_sharding, value)
    return out


def _batch_tokens(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(tokens in the global batch, sequence length) for throughput and MFU."""
    x = batch["tokens"] if "tokens" in batch else next(iter(batch.values()))
    shape = np.shape(x)
    return int(np.prod(shape)) * jax.process_count(), int(shape[-1])


def _check_finite(step: int, metrics: Mapping[str, float], checkpointer: Checkpointer, *,
                  resumed_from: int | None) -> None:
    bad = {k: metrics[k] for k in _FINITE_KEYS if k in metrics and not math.isfinite(metrics[k])}
    if not bad:
        return
    checkpointer.wait()
    shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if k in _FINITE_KEYS)
    if resumed_from is not None and step == resumed_from + 1:
        # The first step from a restored state: its arrays (finite, so they restored without
        # complaint; orbax keeps no checksums) are what went wrong, and every rerun would
        # stop here again. Set the step aside so that the rerun resumes from the previous one.
        aside = checkpointer.set_aside(resumed_from)
        previous = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"non-finite {', '.join(bad)} at step {step}, the first step from checkpoint "
            f"{resumed_from} ({shown}): that checkpoint is corrupt; moved it to {aside}; "
            + (f"rerun the same command to resume from step {previous}" if previous is not None
               else "no earlier checkpoint is left: rerun with --overwrite to start over"))
    last = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
             if last is not None else "no checkpoint was saved yet")
    raise NonFiniteLossError(
        f"non-finite {', '.join(bad)} at step {step} ({shown}); the run stopped and did not save "
        f"this state; {where}. Lower the learning rate, raise clipping, or check this step's "
        "batch.")


def train(*, config: ModelConfig | str | None = None, params_init: Any = None,
          loss_fn: objectives.Objective | Callable,
          loss_kwargs: Mapping[str, Any] | None = None, data_iterator: Iterator,
          optimizer: OptimizerConfig = OptimizerConfig(), num_steps: int, grad_accum: int = 1,
          mesh_spec: sharding.MeshSpec | None = None, rules: str | sharding.Rules = "fsdp",
          workdir: str | os.PathLike, save_every: int = 1000, keep: int = 3,
          log_every: int = 10, seed: int = 0, reference: str = "none",
          export_hf_dir: str | os.PathLike | None = None, progress: bool = True,
          operative_config: str | None = None,
          lora: "lora_lib.LoraConfig | Mapping[str, Any] | None" = None,
          export_peft_dir: str | os.PathLike | None = None,
          export_tokenizer_dir: str | os.PathLike | None = None,
          lora_init: Any = None,
          evaluation: "evaluation_lib.Evaluator | None" = None,
          external_logging: ExternalLogging | None = None) -> TrainState:
    """Trains `config`'s model on `loss_fn` for `num_steps` updates, resuming if it can.

    Args:
      config: a ModelConfig or preset name; None to take it from a Hugging Face `params_init`.
      params_init: None (random init from `seed`), a Hugging Face checkpoint dir, or a params tree.
      loss_fn: an `align_jax.losses.objectives.Objective`, or a bare loss in its calling
        convention `loss_fn(params, batch, *, config, rng, ref_params, **loss_kwargs)
        -> (loss, metrics)`.
      loss_kwargs: the objective's options; a key it does not take fails here, at the start.
      data_iterator: yields global batches (dicts of arrays, leading batch axis) and has
        `get_state() -> JSON-able dict` and `set_state(dict)`, checkpointed with the state.
      optimizer: the optimizer and schedule settings.
      num_steps: total updates of the run (a resumed run continues to this count).
      grad_accum: microbatches per update (the batch axis must divide evenly).
      mesh_spec: the ('data', 'fsdp', 'tensor') mesh; default: all devices on `data`.
      rules: sharding preset: "dp", "fsdp" or "fsdp_tp" (or a rule table).
      workdir: checkpoints/, metrics.jsonl, tensorboard/, run_info.json go here.
      save_every: checkpoint every this many steps (and at the end and on SIGTERM).
      keep: checkpoints to keep.
      log_every: write metrics every this many steps.
      seed: params init (when random) and the step's randomness.
      reference: how the objective's reference model is made: "none" (no reference);
        "precomputed" (every batch carries the reference log-probs as `ref_logps`, no second
        model in memory); "params" (a frozen copy of the initial params in
        `state.ref_params`, e.g. DPO with the SFT model as reference); "adapters_off" (LoRA
        only: the frozen base with the adapters off; with LoRA "params" means the same).
      export_hf_dir: when set, the final params (LoRA: merged) are saved there as Hugging
        Face safetensors (written to a temporary folder and renamed into place when
        complete; not written when the run stops early).
      progress: show a progress bar.
      operative_config: gin's operative config text, written to `<workdir>/config.gin`.
      lora: train LoRA adapters on a frozen base (`models.lora.LoraConfig` or a dict of its
        fields): state.params are the adapters, state.ref_params the base (see
        `train.adapters`).
      export_peft_dir: with LoRA, where the final adapters are saved in peft's format.
      export_tokenizer_dir: tokenizer files copied into the export before it is renamed.
      lora_init: with LoRA, the adapter weights a fresh run starts from (e.g. those of
        `lora.load_peft`) instead of a new init; a resumed run takes its checkpoint's.
      evaluation: an eval set scored during training (`train.evaluation.Evaluator`): at step
        0 of a fresh run when its config says on_start, every `every` steps and after the
        last; its best-so-far record is checkpointed with every save; with keep_best the
        best evaluation's checkpoint is kept and exported instead of the last step's; with
        early_stopping_patience the run stops early, setting `evaluation.stop_reason`.
      external_logging: W&B / MLflow writers that also get the metric records.
    Returns:
      the final TrainState; `state.step < num_steps` when SIGTERM (or early stopping, see
      `evaluation.stop_reason`) cut the run short.
    """
    if reference not in REFERENCES:
        raise ValueError(f"train(reference={reference!r}): choose one of {REFERENCES}")
    spec = lora_lib.lora_config(lora)
    if reference == "adapters_off" and spec is None:
        raise ValueError("train(reference='adapters_off') needs lora=...")
    objective = objectives.as_objective(loss_fn)
    loss_kwargs = objective.check_options(loss_kwargs or {})
    if not (hasattr(data_iterator, "get_state") and hasattr(data_iterator, "set_state")):
        raise TypeError("train(): data_iterator needs get_state() and set_state(state) so a "
                        "resumed run continues the data where it stopped")
    if num_steps < 1 or save_every < 1 or grad_accum < 1:
        raise ValueError(f"train(): num_steps={num_steps}, save_every={save_every} and "
                         f"grad_accum={grad_accum} must be >= 1")
    workdir = os.path.abspath(os.fspath(workdir))
    mesh = sharding.make_mesh(mesh_spec or sharding.MeshSpec())
    config, given_params, owned = _resolve_model(config, params_init, mesh=mesh, rules=rules)
    if config.param_dtype != "float32":
        # Master params stay float32 (updates smaller than a bf16 ulp must not vanish); the
        # model casts them to config.dtype for compute.
        log.info("train(): param_dtype %s -> float32 master params", config.param_dtype)
        config = dataclasses.replace(config, param_dtype="float32")
    tx, schedule = make_optimizer(optimizer, num_steps=num_steps)
    frozen_reference = reference in ("params", "adapters_off")
    # With LoRA the state always holds the frozen base (as ref_params), reference or not.
    with_ref = frozen_reference or spec is not None
    # With LoRA the frozen base may be held in a lower precision than the float32 adapters.
    frozen = adapters_lib.base_config(config, spec) if spec is not None else config
    abstract = adapters_lib.abstract_run_state(config, tx=tx, lora=spec, with_ref=with_ref)
    shardings = train_state_shardings(abstract, mesh, rules)
    is_main = jax.process_index() == 0

    def initial():
        """The frozen params: the reference copy, or with LoRA the base."""
        if spec is None:
            return _initial_params(config, given_params, owned=owned, seed=seed, mesh=mesh,
                                   rules=rules, param_shardings=shardings.params)
        return _initial_params(frozen, given_params, owned=owned, seed=seed, mesh=mesh,
                               rules=rules, param_shardings=shardings.ref_params)

    with contextlib.ExitStack() as stack:
        keep_best = evaluation is not None and evaluation.config.keep_best
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep,
                                    keep_best=keep_best)
        # Closing waits for the pending async save, so the last good checkpoint is complete
        # whatever stops the run.
        stack.callback(checkpointer.close)
        start, state, data_state = checkpointer.restore_latest(
            abstract_arrays(abstract, shardings), say=log.warning)
        if is_main:
            write_run_info(workdir, operative_config=operative_config, extra={
                "resumed_from_step": start, "num_steps": num_steps, "grad_accum": grad_accum,
                "seed": seed, "rules": rules, "mesh": dict(mesh.shape), "reference": reference,
                "optimizer": vars(optimizer), "model": vars(config),
                "lora": dataclasses.asdict(spec) if spec is not None else None,
                "loss_fn": objective.name})
        if start is not None:
            if data_state is not None:
                data_iterator.set_state(data_state)
            if evaluation is not None:
                evaluation.set_state(checkpointer.evaluation_state(start))
                if keep_best:
                    checkpointer.protect(evaluation.tracker.best_step)
            if with_ref:
                state = state.replace(ref_params=initial())
            log.info("resumed from %s at step %d", checkpointer.directory, start)
        elif spec is not None:
            init_adapters = jax.jit(functools.partial(lora_lib.init_lora_weights, config, spec),
                                    out_shardings=shardings.params)
            weights = (init_adapters(jax.random.fold_in(jax.random.key(seed), 0x10A))
                       if lora_init is None else jax.device_put(lora_init, shardings.params))
            state = compile_lib.init_train_state(weights, tx=tx, seed=seed,
                                                 state_shardings=shardings, ref_params=initial())
        else:
            params = initial()
            ref = jax.device_put(params, shardings.params, may_alias=False) if with_ref else None
            state = compile_lib.init_train_state(params, tx=tx, seed=seed,
                                                 state_shardings=shardings, ref_params=ref)

        loss = objective.bind(config=config, options=loss_kwargs)
        if spec is not None:
            loss = adapters_lib.bind_lora_loss(loss, spec, reference=frozen_reference)
        step_fn = compile_lib.jit_train_step(
            loss=loss, tx=tx, schedule=schedule, grad_accum=grad_accum, mesh=mesh, rules=rules,
            state_shardings=shardings)
        batch_sharding = compile_lib.batch_shardings(mesh, rules)
        num_batch_shards = math.prod(
            mesh.shape[a] for a in jax.tree.leaves(batch_sharding.spec[0]) if a is not None)
        put = functools.partial(_put_batch, batch_sharding=batch_sharding,
                                num_shards=num_batch_shards)
        if evaluation is not None:
            eval_loss = objective.bind(config=config, options=loss_kwargs)
            if spec is not None:  # no adapter dropout when scoring
                eval_loss = adapters_lib.bind_lora_loss(
                    eval_loss, dataclasses.replace(spec, dropout=0.0),
                    reference=frozen_reference)
            eval_fn = compile_lib.jit_eval_step(loss=eval_loss, mesh=mesh, rules=rules,
                                                state_shardings=shardings)
        devices = mesh.devices.flatten()
        preemption = stack.enter_context(_Preemption())
        logger = MetricsLogger(workdir, num_steps=num_steps, start_step=start or 0,
                               log_every=log_every, num_devices=len(devices),
                               device_kind=devices[0].device_kind, enabled=is_main,
                               progress=progress, external=external_logging)
        stack.callback(logger.close)

        def report(item):
            n, metrics, tokens = item
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _check_finite(n, host, checkpointer, resumed_from=start)
            logger.record(n, host, tokens=tokens)

        step = start or 0
        last_saved = start
        if evaluation is not None and start is None and evaluation.config.on_start:
            _evaluate(evaluation, eval_fn, state, 0, put=put, logger=logger)
        data_state = data_iterator.get_state()
        pending: tuple[int, Any, int] | None = None
        seq_len_seen = None
        while step < num_steps and preemption.name is None and \
                (evaluation is None or evaluation.stop_reason is None):
            try:
                host_batch = next(data_iterator)
            except StopIteration:
                raise ValueError(
                    f"train(): the data iterator ran out after step {step} of {num_steps}; "
                    "give more data or fewer num_steps") from None
            data_state = data_iterator.get_state()
            if reference == "precomputed" and step == (start or 0) \
                    and "ref_logps" not in host_batch:
                raise ValueError("train(reference='precomputed'): the batches carry no "
                                 f"'ref_logps' (keys: {sorted(host_batch)}); attach the "
                                 "reference log-probs (train.reference) or use 'params'")
            tokens, seq_len = _batch_tokens(host_batch)
            if seq_len != seq_len_seen:
                seq_len_seen = seq_len
                logger.flops_per_token = config.flops_per_token(seq_len)
            batch = _put_batch(host_batch, batch_sharding, num_batch_shards)
            if step == (start or 0) and jax.process_count() > 1:
                # Compile, then start the first step together: CPU collectives (gloo) give a
                # peer 30 s to join, less than one process's compile may run ahead of another's.
                with sharding.use_mesh(mesh, rules):
                    step_fn.jitted.lower(state, batch).compile()
                distributed.barrier("align_jax.train.step_compiled")
            # Implicit host<->device copies inside the step are bugs (a stray numpy constant, a
            # Python scalar in the state): make them errors. Batches were placed explicitly.
            with jax.transfer_guard("disallow"):
                state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                # Step `step` is already queued on the device: reading step-1's metrics now
                # overlaps the host sync with the device's work.
                report(pending)
            pending = (step, metrics, tokens)
            improved = stopping = False
            if evaluation is not None and evaluation.due(step, num_steps):
                report(pending)  # a non-finite step is not evaluated
                pending = None
                improved = _evaluate(evaluation, eval_fn, state, step, put=put, logger=logger)
                stopping = evaluation.stop_reason is not None
            if step % save_every == 0 or step == num_steps or stopping or \
                    (improved and keep_best):
                # Check this step's loss and norms before its state may become a checkpoint.
                if pending is not None:
                    report(pending)
                    pending = None
                checkpointer.save(step, state, data_state=data_state,
                                  evaluation=_eval_state(evaluation))
                if improved and keep_best:
                    # After the save: the previous best goes only once this step is on disk.
                    checkpointer.protect(step)
                last_saved = step
        if pending is not None:
            report(pending)
        if evaluation is not None and evaluation.stop_reason is not None:
            checkpointer.wait()
            logger.write_line(f"{evaluation.stop_reason}; stopped at step {step} of "
                              f"{num_steps}.")
        elif step < num_steps:  # SIGTERM or SIGINT
            if last_saved != step:
                checkpointer.save(step, state, data_state=data_state,
                                  evaluation=_eval_state(evaluation))
            checkpointer.wait()
            logger.write_line(f"{preemption.name}: saved a checkpoint at step {step} in "
                              f"{checkpointer.directory}; stopping.")
            return state
        checkpointer.wait()
        if preemption.name is not None:
            # It arrived during the final save, which is complete: stop before the export.
            raise interrupts.Interrupted(preemption.name, "during the final checkpoint save")
        exported = state
        if keep_best and evaluation.tracker.best_step not in (None, step):
            exported = _restore_best(checkpointer, evaluation.tracker.best_step, state,
                                     abstract_arrays(abstract, shardings))
            logger.write_line(f"exporting the best evaluation's checkpoint, step "
                              f"{evaluation.tracker.best_step} (eval "
                              f"{evaluation.config.metric}={evaluation.tracker.best_value:.6g})")

    if spec is not None:
        adapters = lora_lib.Adapters(weights=exported.params, spec=spec)
        if export_peft_dir is not None:
            export_peft(config, adapters, export_peft_dir,
                        init_from=params_init if isinstance(params_init, (str, os.PathLike))
                        else None, base_params=state.ref_params,
                        tokenizer_dir=export_tokenizer_dir)
        if export_hf_dir is not None:
            dtype = jax.numpy.dtype(config.param_dtype)
            merged = jax.jit(lambda base, a: jax.tree.map(
                lambda x: x.astype(dtype), lora_lib.merge_lora(config, base, a)))(
                state.ref_params, adapters)
            export_hf(config, merged, export_hf_dir, tokenizer_dir=export_tokenizer_dir)
    elif export_hf_dir is not None:
        export_hf(config, exported.params, export_hf_dir, tokenizer_dir=export_tokenizer_dir)
    return state


def _eval_state(evaluation: "evaluation_lib.Evaluator | None") -> Any:
    return None if evaluation is None else evaluation.get_state()


def _evaluate(evaluation: "evaluation_lib.Evaluator", eval_fn, state: TrainState, step: int, *,
              put, logger: MetricsLogger) -> bool:
    """Scores the eval set at `step` and logs it; returns whether it is the best so far (the
    step-0 baseline is logged only: no checkpoint holds it)."""
    metrics = evaluation_lib.evaluate(eval_fn, state, evaluation.batches, put=put)
    if step == 0:
        logger.record_eval(0, metrics, note="before training")
        return False
    improved = evaluation.record(step, metrics)
    t = evaluation.tracker
    logger.record_eval(step, metrics, note="best so far" if improved else
                       f"best: step {t.best_step}, {evaluation.config.metric}="
                       f"{t.best_value:.4g}" if t.best_step is not None else "")
    return improved


def _restore_best(checkpointer: Checkpointer, step: int, state: TrainState,
                  target: TrainState) -> TrainState:
    """The checkpoint of the best evaluation, with the run's frozen params (not saved)."""
    if step not in checkpointer.all_steps():
        raise FileNotFoundError(f"{checkpointer.directory}: the best evaluation's checkpoint, "
                                f"step {step}, is missing (steps: {checkpointer.all_steps()})")
    best, _ = checkpointer.restore(step, target)
    return best.replace(ref_params=state.ref_params)


def export_peft(config: ModelConfig, adapters: "lora_lib.Adapters", path: str | os.PathLike,
                *, init_from: str | os.PathLike | None = None, base_params: Any = None,
                tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Saves LoRA adapters in peft's format at `path` (main process only; written to a
    temporary folder and renamed into place when complete), naming the base so that
    `peft.AutoPeftModelForCausalLM` loads it offline: `init_from`'s local dir, or with none
    the frozen `base_params` written into `<path>/base` (`adapters.write_peft_export`)."""
    weights = adapters.weights
    gather = (lambda x: multihost_utils.process_allgather(x, tiled=True)
              if jax.process_count() > 1 else x)
    weights = gather(weights)
    base = None if init_from or base_params is None else gather(base_params)
    if jax.process_index() == 0:
        with atomic_dir(path) as tmp:
            adapters_lib.write_peft_export(
                config, adapters.replace(weights=jax.device_get(weights)), os.fspath(tmp),
                final_dir=os.fspath(path), init_from=os.fspath(init_from) if init_from else None,
                base_params=lambda: jax.device_get(base),
                tokenizer_dir=os.fspath(tokenizer_dir) if tokenizer_dir else None)


def export_hf(config: ModelConfig, params: Any, path: str | os.PathLike, *,
              tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Saves `params` as a Hugging Face checkpoint (safetensors) at `path` (main process only).

    The files go to a temporary sibling folder renamed to `path` once complete, so `path` is
    never a half-written export (an earlier export there is replaced whole).

    Args:
      config: the model.
      params: the (possibly sharded) parameter tree.
      path: the output dir.
      tokenizer_dir: a tokenizer dir or .model file whose files are copied in too.
    """
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    host = jax.device_get(params)
    if jax.process_index() == 0:
        with atomic_dir(path) as tmp:
            save_hf(config, host, os.fspath(tmp))
            if tokenizer_dir is not None:
                copy_tokenizer_files(tokenizer_dir, os.fspath(tmp))
