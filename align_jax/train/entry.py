"""`align-jax train`: one objective on one dataset, configured by gin.

    align-jax train --gin_file=configs/runs/sft_tiny.gin --gin_param='train_main.num_steps=50'

`train_main` is the configurable surface: gin binds its arguments (model, data, objective,
optimizer, mesh); everything below it is plain library code.
"""

import dataclasses
import functools
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from align_jax import distributed, sharding
from align_jax.atomic import atomic_dir, atomic_write_json
from align_jax.losses import objectives
from align_jax.models.config import ModelConfig, get_config
from align_jax.models.hf import config_to_hf, load_hf
from align_jax.models.lora import lora_config
from align_jax.models.named import resolve_model_path
from align_jax.run_lock import run_lock
from align_jax.runinfo import run_folder
from align_jax.tokenizer import copy_tokenizer_files, load_tokenizer
from align_jax.tokenizer_training import train_tokenizer
from align_jax.train import status as status_lib
from align_jax.train.adapters import continue_from_peft, peft_base_path, write_lora_file
from align_jax.train.evaluation import EvalConfig, Evaluator
from align_jax.train.loop import train
from align_jax.train.metrics import ExternalLogging
from align_jax.train.optim import OptimizerConfig
from align_jax.train.plan import check_train_memory, load_model_config
from align_jax.train.reference import attach_reference_logps

log = logging.getLogger(__name__)

# The registry of objectives (one `Objective` record each); kept under this name for callers.
OBJECTIVES = objectives.OBJECTIVES
REFERENCE_MODES = objectives.REFERENCE_MODES


def _model(model: str | ModelConfig | None, overrides: Mapping[str, Any], init_from, tokenizer):
    """The config to train, or None to take it from `init_from`'s config.json."""
    if init_from is not None:
        if model is not None and model != "hf":
            raise ValueError(f"train_main: give either model={model!r} or init_from="
                             f"{init_from!r}, not both (the checkpoint has its own config)")
        return None
    config = get_config(model) if isinstance(model, str) else model
    if config is None:
        raise ValueError("train_main: set `model` (a preset name) or `init_from` (an HF dir)")
    overrides = dict(overrides)
    if "vocab_size" not in overrides and config.vocab_size != tokenizer.vocab_size:
        # A model trained from scratch takes its vocabulary from the tokenizer.
        log.info("train_main: vocab_size %d -> %d (the tokenizer's)", config.vocab_size,
                 tokenizer.vocab_size)
        overrides["vocab_size"] = tokenizer.vocab_size
    for key in ("bos_id", "eos_id", "pad_id"):
        field = key.replace("_id", "_token_id")
        if field not in overrides:
            overrides[field] = getattr(tokenizer, key)
    return dataclasses.replace(config, **overrides)


def _steps_per_epoch(make) -> int:
    loader = make(num_epochs=1)
    try:
        return sum(1 for _ in loader)
    finally:
        loader.close()


def train_main(*, output_dir: str, data: str | Sequence[tuple[str, float]], objective: str = "sft",
               model: str | ModelConfig | None = None,
               model_overrides: Mapping[str, Any] | None = None, init_from: str | None = None,
               tokenizer: str | None = None, seq_len: int = 512, batch_size: int = 8,
               pack: bool = True, truncation: str = "truncate_prompt_left",
               on_error: str = "raise", num_epochs: int = 1, num_steps: int | None = None,
               optimizer: OptimizerConfig | None = None, grad_accum: int = 1,
               mesh: sharding.MeshSpec | None = None, rules: str = "fsdp",
               loss_kwargs: Mapping[str, Any] | None = None, reference: str = "precomputed",
               vocab_chunk_size: int = 0, save_every: int = 1000, keep: int = 3,
               log_every: int = 10, seed: int = 0, export_hf: bool = True,
               progress: bool = True, lora: Mapping[str, Any] | None = None,
               lora_from: str | None = None, overwrite: bool = False,
               evaluation: EvalConfig | None = None,
               loggers: Sequence[str] = ()) -> dict[str, Any]:
    """Trains one objective and exports the result as a Hugging Face checkpoint.

    Args:
      output_dir: run folder (checkpoints/, metrics.jsonl, tensorboard/, hf/ export).
      data: records in the objective's schema (a .jsonl path or dir,
        "hf:<name>[:<config>[:<split>]]", "tfds:..."), or a mixture drawn by weight:
        [(spec, weight), ...] or "spec@weight,spec@weight" (`align_jax.data.make_loader`).
      objective: a registered objective (`align_jax.losses.objectives`): "sft", "lm" (raw
        text, the c-fine-tuned baseline), "dpo", "kto", "sami", "aligner" (aligner triples;
        init_from must carry the markers, see losses.aligner.add_marker_tokens), or one a
        module registers.
      model: a preset name (random init) when not starting from a checkpoint.
      model_overrides: ModelConfig fields to replace (e.g. {"dtype": "bfloat16"}).
      init_from: a Hugging Face checkpoint dir to start from (and DPO's reference model).
      tokenizer: tokenizer dir or .model; default: init_from. "train:<text file>" trains a
        small sentencepiece tokenizer on that file into <output_dir>/tokenizer (tiny runs).
      seq_len, batch_size, pack, truncation, on_error: how records become batches (see
        `align_jax.data.make_loader`); batch_size is global.
      num_epochs: passes over the data when num_steps is None.
      num_steps: updates; None derives it from num_epochs.
      optimizer: optimizer and schedule; default AdamW at 3e-4, cosine.
      grad_accum: microbatches per update.
      mesh, rules: the device mesh and sharding preset.
      loss_kwargs: keyword arguments of the objective (beta, loss_type, rpo_alpha, ...).
      reference: the reference of objectives that use one: "precomputed" (log-probs computed
        once over the data, no second model in memory) or "params" (a frozen copy of the
        initial params); an objective that cannot use the mode asked for takes its own (KTO:
        "params"). With LoRA, every reference is "adapters_off": the frozen base with the
        adapters switched off, scored in the same step (no second copy, no precompute pass).
      vocab_chunk_size: >0 computes log-probs over vocabulary chunks of this size; 0 does so
        automatically above 32k entries (`losses.logprobs.resolve_vocab_chunk`); <0 never.
      save_every, keep, log_every, seed: checkpointing, logging and randomness.
      export_hf: write the final model and tokenizer to <output_dir>/hf.
      progress: show progress bars.
      lora: train LoRA adapters on a frozen base instead of all params, e.g.
        {'rank': 8, 'alpha': 16, 'targets': ('q', 'v'), 'base_dtype': 'bfloat16'} (fields of
        `align_jax.models.lora.LoraConfig`). Only the adapters are updated and checkpointed;
        the export is the merged model (<output_dir>/hf) and the adapter (<output_dir>/peft).
      lora_from: a peft adapter dir (an earlier run's <output_dir>/peft, or peft's own) whose
        adapters training continues from; rank, alpha and targets are the adapter's (`lora`
        may set dropout and base_dtype), init_from defaults to its base_model_name_or_path.
      overwrite: clear what an earlier run wrote into output_dir and start over (otherwise a
        rerun with the same settings resumes and one with other settings is refused).
      evaluation: an eval set scored during training and what to do with its scores (an
        `EvalConfig`: data, every, keep_best, early_stopping_patience, metric, batch_size);
        None or data None: no evaluation. Metrics go to metrics.jsonl and TensorBoard as
        eval/<name>.
      loggers: also send the metric records to these, each when installed (one warning line
        otherwise): "wandb" (wandb.init with the run's settings as config) and/or "mlflow".
    Returns:
      A summary dict (also written to <output_dir>/train_summary.json) whose "status" is
      "completed" (also after early stopping, which its "evaluation" entry and status.json's
      message name); SIGTERM/SIGINT save a checkpoint and raise RunInterrupted (exit code 75).
    """
    args = dict(locals())
    settings = {k: v for k, v in args.items() if k not in _NOT_SETTINGS}
    if lora_from is None:  # unset: run folders recorded before lora_from existed still resume
        del settings["lora_from"]
    if evaluation is not None and not isinstance(evaluation, EvalConfig):
        raise TypeError(f"train_main.evaluation={evaluation!r}: expected an EvalConfig "
                        "(bind @evaluation.EvalConfig())")
    if evaluation is None or not evaluation.enabled:  # as for lora_from
        del settings["evaluation"]
    _check_arguments(batch_size=batch_size, seq_len=seq_len, num_steps=num_steps,
                     num_epochs=num_epochs, grad_accum=grad_accum, save_every=save_every,
                     keep=keep, log_every=log_every)
    # The objective, its loss keywords and the loggers are checked before the run folder is
    # touched.
    _objective_and_options(objective, loss_kwargs, vocab_chunk_size)
    args["loggers"] = ExternalLogging(names=tuple(loggers), config=status_lib.jsonable(settings),
                                      run_name=os.path.basename(os.path.abspath(output_dir)))

    with run_lock(output_dir if jax.process_index() == 0 else None):
        data_files = status_lib.data_identity(data)
        resuming = status_lib.check_settings(output_dir, settings, overwrite=overwrite,
                                             data_files=data_files)
        if resuming and num_steps is not None:
            _check_not_below_checkpoints(output_dir, num_steps)
        settings[status_lib.DATA_FILES] = data_files
        settings[status_lib.RELATIVE_PATHS] = status_lib.relative_paths(output_dir, settings)
        done = _completed(output_dir, export_hf, num_steps) if resuming else None
        if done is not None:
            print(f"{output_dir}: already completed at step {done['step']} with these "
                  "settings; nothing to do (--overwrite to train again)", flush=True)
            return done
        with status_lib.sigterm_as_keyboard_interrupt():
            return _train_main(settings, **args)


def _objective_and_options(objective, loss_kwargs, vocab_chunk_size):
    """The Objective record and its checked loss keywords: a misspelled keyword fails here,
    naming the objective and the key, before any data is read or any file written."""
    try:
        obj = objectives.get_objective(objective)
    except ValueError as e:
        raise ValueError(f"train_main.{e}") from None
    loss_kwargs = dict(loss_kwargs or {})
    if vocab_chunk_size:
        loss_kwargs["vocab_chunk_size"] = vocab_chunk_size
    return obj, obj.check_options(loss_kwargs)


# Arguments a rerun may change and still resume: they do not change what a run computes, or
# (num_steps, num_epochs) they say how far to go, so a longer rerun continues the same run.
_NOT_SETTINGS = ("output_dir", "progress", "log_every", "save_every", "keep", "overwrite",
                 "num_steps", "num_epochs", "loggers")


def _check_arguments(**values: int | None) -> None:
    """Types and ranges of the integer arguments, named (a gin typo is not a Python error)."""
    for name, value in values.items():
        if value is None and name == "num_steps":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"train_main.{name}={value!r}: expected an integer, got "
                            f"{type(value).__name__}")
        if value < 1:
            raise ValueError(f"train_main.{name}={value}: must be >= 1")
    batch, accum = values["batch_size"], values["grad_accum"]
    if batch % accum:
        fits = math.gcd(batch, accum)
        raise ValueError(
            f"train_main.batch_size={batch} is not divisible by grad_accum={accum}: batch_size "
            f"is the global batch of one update, split into grad_accum microbatches; set "
            f"batch_size={accum * max(1, round(batch / accum))} or grad_accum={fits}")


def _check_not_below_checkpoints(output_dir: str, num_steps: int) -> None:
    """A rerun asking for fewer steps than the run already trained would label the run with
    the smaller number: refused, naming the step."""
    last = _last_checkpoint(output_dir)
    if last is not None and last > num_steps:
        raise ValueError(f"{output_dir}: num_steps={num_steps} is below the newest checkpoint, "
                         f"step {last}; ask for at least {last} steps, or pass --overwrite to "
                         "start over")


def _set_aside_old_exports(output_dir: str, num_steps: int) -> None:
    """A continuation (more steps than the run ended at) renames the export of the earlier
    end (hf/, peft/) to hf_step_<step>/: an interrupted continuation never leaves an hf/ that
    looks like this run's result."""
    summary = status_lib.read_json(os.path.join(output_dir, "train_summary.json")) or {}
    step = summary.get("step") if summary.get("status") == "completed" else None
    step = step if isinstance(step, int) else _last_checkpoint(output_dir)
    if step is None or step >= num_steps:
        return
    for name in ("hf", "peft"):
        old = os.path.join(output_dir, name)
        if not os.path.isdir(old):
            continue
        aside = os.path.join(output_dir, f"{name}_step_{step}")
        if os.path.lexists(aside):
            shutil.rmtree(aside)
        os.rename(old, aside)
        print(f"{output_dir}: this run continues from step {step} to {num_steps}; the export "
              f"of step {step} moved from {name}/ to {os.path.basename(aside)}/", flush=True)


def _completed(output_dir: str, export_hf: bool, num_steps: int | None) -> dict[str, Any] | None:
    """The summary of a run that already completed its `num_steps` (with its export), else
    None (a rerun asking for more steps continues from the last checkpoint)."""
    status = status_lib.read_status(output_dir)
    summary = status_lib.read_json(os.path.join(output_dir, "train_summary.json"))
    if not status or status.get("status") != "completed" or not summary:
        return None
    if num_steps is not None and int(summary.get("num_steps", 0)) < num_steps:
        return None
    if export_hf and not os.path.exists(os.path.join(output_dir, "hf", "config.json")):
        return None
    return summary


def _train_main(settings, *, output_dir, data, objective, model, model_overrides, init_from,
                tokenizer, seq_len, batch_size, pack, truncation, on_error, num_epochs,
                num_steps, optimizer, grad_accum, mesh, rules, loss_kwargs, reference,
                vocab_chunk_size, save_every, keep, log_every, seed, export_hf, progress,
                lora=None, lora_from=None, overwrite=False, evaluation=None,
                loggers=None):
    # Local: the loaders import grain (seconds), needed only once a run starts.
    from align_jax.data import make_loader

    obj, loss_kwargs = _objective_and_options(objective, loss_kwargs, vocab_chunk_size)
    if lora_from is not None:  # the adapter's own settings replace this spec once read
        init_from = init_from or (None if model else peft_base_path(lora_from))
    lora_spec = lora_config(lora if lora_from is None else lora or {})
    if reference == "adapters_off" and lora_spec is None:
        raise ValueError("train_main.reference='adapters_off' needs train_main.lora=...")
    ref_mode = obj.reference_mode("params" if reference == "adapters_off" else reference,
                                  loss_kwargs)
    if lora_spec is not None and ref_mode != "none":
        # The base with the adapters off is the initial model: the reference comes from the
        # same weights in the same step, for any mode the objective would otherwise use.
        ref_mode = "adapters_off"
    fmt = obj.data_format
    if init_from is not None:  # a named default or a .gguf file -> its cached HF dir
        init_from = resolve_model_path(init_from)
    tok_path = tokenizer or init_from
    if tok_path is None:
        raise ValueError("train_main: set `tokenizer` (or `init_from`, whose dir has one)")
    if tok_path.startswith("train:"):
        # Process 0 trains it into the (shared) run folder; the others wait and read it.
        built = os.path.join(output_dir, "tokenizer")
        if distributed.is_main():
            build_tokenizer(tok_path.removeprefix("train:"), built)
        distributed.barrier("align_jax.train_main.tokenizer")
        tok_path = built
    tok = load_tokenizer(tok_path)
    config = _model(model, model_overrides or {}, init_from, tok)
    lora_init = None
    if lora_from is not None:
        lora_spec, lora_init = continue_from_peft(config, lora_from, lora, init_from=init_from)
    # Before any weight is loaded: a batch that cannot fit is refused with the numbers.
    check_train_memory(config or load_model_config(init_from), objective=obj.name,
                       frozen_reference=ref_mode == "params", batch_size=batch_size,
                       seq_len=seq_len, mesh_spec=mesh, rules=rules, optimizer=optimizer,
                       lora=lora_spec)

    with run_folder(output_dir):
        main = distributed.is_main()
        if main:
            status_lib.record_settings(output_dir, settings)
            _write_model_files(output_dir, config, init_from, tok_path)
            status_lib.write_status(output_dir, "running", step=None, num_steps=num_steps)
        state = None
        try:
            params_init: Any = init_from
            annotate = None
            if lora_spec is not None and main:
                write_lora_file(os.path.join(output_dir, "model"), lora_spec,
                                init_from=init_from, seed=seed)
            if ref_mode == "precomputed":
                if init_from is None:
                    raise ValueError(f"train_main: objective {obj.name!r} needs a reference "
                                     "model: set init_from (the SFT checkpoint), or for DPO "
                                     "use loss_kwargs={'reference_free': True}")
                config, params_init = load_hf(init_from)
                annotate = functools.partial(
                    attach_reference_logps, precompute=obj.precompute_reference, config=config,
                    params=params_init, seq_len=seq_len,
                    batch_size=batch_size, cache_dir=os.path.join(output_dir, "cache"),
                    vocab_chunk_size=vocab_chunk_size,
                    mesh=sharding.make_mesh(mesh or sharding.MeshSpec()), rules=rules)

            peft_dir = (os.path.join(output_dir, "peft")
                        if export_hf and lora_spec is not None else None)
            make = functools.partial(
                make_loader, data, kind=fmt, tokenizer=tok, seq_len=seq_len,
                batch_size=batch_size, pack=pack and fmt.build_packed is not None,
                truncation=truncation, seed=seed, on_error=on_error, annotate=annotate)
            if num_steps is None:
                num_steps = max(1, _steps_per_epoch(make) * num_epochs)
                _check_not_below_checkpoints(output_dir, num_steps)
            if main:
                _set_aside_old_exports(output_dir, num_steps)
            evaluator = None
            if evaluation is not None and evaluation.enabled:
                evaluator = _evaluator(evaluation, functools.partial(
                    make_loader, evaluation.data, kind=fmt, tokenizer=tok, seq_len=seq_len,
                    batch_size=evaluation.batch_size or batch_size, truncation=truncation,
                    seed=seed, on_error=on_error, annotate=annotate,
                    pack=pack and fmt.build_packed is not None))
            loader = make(num_epochs=None)
            hf_dir = os.path.join(output_dir, "hf")
            state = train(config=config, params_init=params_init, loss_fn=obj,
                          loss_kwargs=loss_kwargs, data_iterator=loader,
                          optimizer=optimizer or OptimizerConfig(), num_steps=num_steps,
                          grad_accum=grad_accum, mesh_spec=mesh, rules=rules,
                          workdir=output_dir, save_every=save_every, keep=keep,
                          log_every=log_every, seed=seed,
                          reference=ref_mode,
                          export_hf_dir=hf_dir if export_hf else None,
                          export_tokenizer_dir=tok_path, progress=progress, lora=lora_spec,
                          export_peft_dir=peft_dir, lora_init=lora_init,
                          evaluation=evaluator, external_logging=loggers)
            loader.close()
        except KeyboardInterrupt as e:
            last = _last_checkpoint(output_dir)
            if main:
                status_lib.write_status(output_dir, "interrupted", step=last, num_steps=num_steps,
                                        message=f"{str(e) or 'SIGINT'} outside the step loop")
            raise status_lib.RunInterrupted(
                f"{output_dir}: interrupted ({str(e) or 'SIGINT'}) before the run finished; the "
                f"last checkpoint is step {last}; rerun the same command to resume") from None
        except BaseException as e:
            if main:
                status_lib.write_status(output_dir, "failed",
                                        step=_last_checkpoint(output_dir), num_steps=num_steps,
                                        message=f"{type(e).__name__}: {str(e)[:500]}")
            raise
        step = int(state.step)
        stop_reason = evaluator.stop_reason if evaluator is not None else None
        completed = step >= num_steps or stop_reason is not None
        summary = {"status": "completed" if completed else "interrupted",
                   "objective": obj.name, "num_steps": num_steps, "step": step,
                   "data": {"load": loader.load_report.summary(),
                            "truncation": loader.truncation_report.summary(),
                            "examples": loader.num_examples},
                   "hf_export": hf_dir if export_hf and completed else None,
                   "peft_export": peft_dir if completed else None,
                   "evaluation": _eval_summary(evaluator, step)}
        if main:
            atomic_write_json(os.path.join(output_dir, "train_summary.json"), summary)
            status_lib.write_status(output_dir, summary["status"], step=step,
                                    num_steps=num_steps, message=stop_reason)
            if completed:
                print(closing_line(output_dir, summary), flush=True)
        if not completed:
            raise status_lib.RunInterrupted(
                f"{output_dir}: interrupted at step {step} of {num_steps}; a checkpoint was "
                "saved; rerun the same command to resume")
    return summary


def _evaluator(evaluation: EvalConfig, make) -> Evaluator:
    """The eval batches, built once (one ordered pass, every example; a padded format
    without a row mask drops a last partial batch, said in the log)."""
    fmt = make.keywords["kind"]
    keep_all = make.keywords["pack"] or fmt.row_mask
    loader = make(num_epochs=1, shuffle=False, drop_remainder=not keep_all)
    try:
        batches = list(loader)
    finally:
        loader.close()
    size = make.keywords["batch_size"]
    if not keep_all and loader.num_examples % size:
        log.warning("EvalConfig.data=%s: %d of %d examples left out (the last partial batch "
                    "of %d; set EvalConfig.batch_size to a divisor)", evaluation.data,
                    loader.num_examples % size, loader.num_examples, size)
    return Evaluator(evaluation, batches)


def _eval_summary(evaluator: Evaluator | None, step: int) -> dict[str, Any] | None:
    if evaluator is None:
        return None
    t, config = evaluator.tracker, evaluator.config
    exported = t.best_step if config.keep_best and t.best_step is not None else step
    return {"metric": config.metric, "best_step": t.best_step, "best_value": t.best_value,
            "keep_best": config.keep_best, "exported_step": exported,
            "stop_reason": evaluator.stop_reason}


def closing_line(output_dir: str, summary: Mapping[str, Any]) -> str:
    """What a finished run says last: how far it went and where its exports are."""
    ev = summary.get("evaluation") or {}
    parts = [f"align-jax train: {output_dir}: done at step {summary['step']} of "
             f"{summary['num_steps']}"
             + (f" ({ev['stop_reason']})" if ev.get("stop_reason") else "")]
    what = ""
    if ev.get("keep_best") and ev.get("best_step") is not None:
        what = (f" (the best evaluation, step {ev['best_step']}: eval {ev['metric']}="
                f"{ev['best_value']:.6g}; its checkpoint: "
                f"{os.path.join(output_dir, 'checkpoints', str(ev['best_step']))})")
    elif ev.get("best_step") is not None:
        what = f" (the last step; best eval {ev['metric']} was at step {ev['best_step']})"
    for key, name in (("hf_export", "hf/"), ("peft_export", "peft/")):
        if summary.get(key):
            parts.append(f"{name} -> {summary[key]}{what}")
    if not summary.get("hf_export"):
        parts.append(f"no export (export_hf=False); checkpoints in "
                     f"{os.path.join(output_dir, 'checkpoints')}")
    return "; ".join(parts)


def _last_checkpoint(output_dir: str) -> int | None:
    return max(status_lib.checkpoint_steps(output_dir), default=None)


def _write_model_files(output_dir: str, config, init_from, tok_path) -> None:
    """<output_dir>/model: config.json and tokenizer files, so any checkpoint of the run can
    be exported later (`align-jax convert`)."""
    model_dir = os.path.join(output_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    if config is None:
        shutil.copy(os.path.join(init_from, "config.json"), model_dir)
    else:
        atomic_write_json(os.path.join(model_dir, "config.json"), config_to_hf(config))
    copy_tokenizer_files(tok_path, model_dir)


def build_tokenizer(text_path: str, out_dir: str, *, vocab_size: int = 512) -> str:
    """Trains a sentencepiece tokenizer on a text file (once; reused when present).

    The folder is written whole or not at all (a rerun after an interruption trains again)."""
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    if not os.path.isfile(text_path):
        raise FileNotFoundError(f"tokenizer=train:{text_path}: no such text file")
    with open(text_path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    with atomic_dir(out_dir) as tmp:
        train_tokenizer(lines, os.fspath(tmp), vocab_size=vocab_size)
    return out_dir
