"""`align-jax eval`: every system answers held-out questions; report.md/.csv/.json and PNGs.

    align-jax eval \
      --gin_param="entry.eval_main.models={'sft': 'runs/demo/sft/hf', 'dpo': 'runs/demo/dpo/hf'}" \
      --gin_param="entry.eval_main.sft_test='runs/demo/data/sft_test.jsonl'" \
      --gin_param="entry.eval_main.preference_test='runs/demo/data/preference_test.jsonl'" \
      --gin_param="entry.eval_main.yes_no_test='examples/yes_no_heldout.jsonl'" \
      --output_dir=runs/eval
"""

import os
import pathlib
from collections.abc import Mapping

from align_jax import distributed, sharding
from align_jax.atomic import atomic_write_json
from align_jax.data.documents import chunk_documents, load_documents
from align_jax.data.sources import load_records
from align_jax.eval.oracle_rag import grounding_oracle
from align_jax.eval.report import YES_NO_INSTRUCTION, evaluate_models
from align_jax.eval.retrieval import make_retriever
from align_jax.models.named import resolve_model_path
from align_jax.runinfo import run_folder
from align_jax.tokenizer import load_tokenizer


def _read(path: str | None, schema: str) -> list[dict]:
    if path is None:
        return []
    return [r.data for r in load_records(path, schema=schema)[0]]


# The files that define a tokenizer in a checkpoint dir (their bytes identify it).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def _tokenizer_files(path: str) -> tuple:
    """What identifies the tokenizer at `path`: its files' names and contents (the resolved
    path itself when it has none of them)."""
    if not os.path.isdir(path):
        return (os.path.realpath(path),)
    found = tuple((f, pathlib.Path(path, f).read_bytes()) for f in _TOKENIZER_FILES
                  if os.path.isfile(os.path.join(path, f)))
    return found or (os.path.realpath(path),)


def eval_main(*, output_dir: str, models: Mapping[str, str], sft_test: str | None = None,
              preference_test: str | None = None, documents: tuple[str, ...] = (),
              rag_models: tuple[str, ...] | None = None, seq_len: int = 1024,
              num_samples: int = 3, max_new_tokens: int = 64, chunk_tokens: int = 256,
              retrieval: str = "semantic", num_questions: int | None = None,
              bertscore_model: str | None = "all-minilm-l6-v2",
              bertscore_layer: int | None = None, bertscore_baseline: str | None = None,
              judge: str | None = None,
              judge_template: str = "relative", judge_kwargs: Mapping | None = None,
              judge_systems: tuple[str, ...] | None = None,
              mesh: sharding.MeshSpec | None = None, rules: str = "fsdp",
              teacher_forced: bool = True, yes_no_test: str | None = None,
              yes_no_instruction: str | None = YES_NO_INSTRUCTION,
              yes_no_max_new_tokens: int = 24, base_model: str | None = None,
              oracle_rag: bool = True) -> int:
    """Scores every model (name -> HF dir), each with its own tokenizer.

    Args:
      output_dir: where the report goes.
      models: display name -> Hugging Face checkpoint dir.
      sft_test: held-out SFT records (answer likelihood, sample answers).
      preference_test: held-out preference records (accuracy of log p chosen > rejected).
      documents: value documents to retrieve from for the RAG rows of `rag_models`.
      rag_models: models also run with the best-matching chunk in the prompt (default all).
      seq_len, num_samples, max_new_tokens, chunk_tokens: scoring and sampling settings.
      retrieval: "semantic" (all-MiniLM-L6-v2, BM25 when missing), "bm25" or "tfidf".
      num_questions: held-out questions every system answers (default all).
      bertscore_model: encoder for BERTScore (None skips it).
      bertscore_layer: its layer (None: the last; the value-alignment paper's setting is a
        roberta-large dir at layer 17, `align_jax.eval.bertscore.PAPER_SETTING`).
      bertscore_baseline: a bert-score baseline file to rescale the scores with (None: raw).
      judge: "local:..." or "openai:..." teacher, or "letters:<dir or name>" (a local judge
        read from its letter probabilities), for pairwise win rates (None skips them).
      judge_template: the judge's prompt template: a name under configs/judge_templates
        ("relative", "pairwise", "prometheus_relative", ...) or a template file.
      judge_kwargs: extra arguments of `align_jax.eval.judge.win_rate_matrix` (rubric,
        principles, max_tokens, temperature, top_p, ...).
      judge_systems: systems the judge compares (default all).
      mesh, rules: device mesh (default: every device, as `align-jax train`) and sharding
        preset: the models are loaded onto it and scored and generated over it.
      teacher_forced: also score the held-out records teacher-forced (answer NLL,
        preference accuracy); False keeps only the generated-answer evaluation, which costs
        the generation plus a few percent (see `evaluate_models`).
      yes_no_test: yes/no questions (`question`, `answer` "yes"/"no"; optional `pair_id`,
        `section`): every system answers them; accuracy against the constant answers.
      yes_no_instruction: appended to each yes/no question (None: the question alone).
      yes_no_max_new_tokens: budget of the yes/no answers (at most max_new_tokens).
      base_model: the model differences are measured against (default "base" when it is one
        of the models, else the first).
      oracle_rag: with `documents`, the RAG models also answer the held-out questions whose
        grounding chunk is known (a `chunk_id` of the documents' chunks at `chunk_tokens`,
        or an `evidence` / `rule` text found in a chunk) with that chunk in the prompt,
        beside their retrieved rows on the same questions (`align_jax.eval.oracle_rag`).
    """
    if not isinstance(models, Mapping):
        raise ValueError(f"eval_main.models must be a mapping name -> path, got a "
                         f"{type(models).__name__}: {models!r}")
    if not models:
        raise ValueError("eval_main.models is empty: map names to checkpoint dirs")
    if not (sft_test or yes_no_test or (preference_test and teacher_forced)):
        raise ValueError("eval_main: nothing to evaluate: give sft_test, yes_no_test or "
                         "preference_test (the last needs teacher_forced=True)")
    # Every record file is read and checked before any model loads.
    sft, pref, yes_no = (_read(sft_test, "sft"), _read(preference_test, "preference"),
                         _read(yes_no_test, "yes_no"))
    # Each model is scored with its own tokenizer; models whose tokenizer files are the same
    # share one (and its formatted records).
    tokenizers, by_files = {}, {}
    for name, path in models.items():
        path = resolve_model_path(path)
        key = _tokenizer_files(path)
        if key not in by_files:
            by_files[key] = load_tokenizer(path)
        tokenizers[name] = by_files[key]
    tok = next(iter(tokenizers.values()))  # the documents' chunks are measured in its tokens
    retriever = oracle = None
    if documents:
        chunks = chunk_documents(load_documents(documents), tok, chunk_tokens=chunk_tokens,
                                 overlap=chunk_tokens // 8)
        retriever = make_retriever([c.text for c in chunks], kind=retrieval)
        oracle = grounding_oracle(chunks) if oracle_rag else None
    with run_folder(output_dir):
        report = evaluate_models(output_dir, models=dict(models), tokenizer=tokenizers,
                                 sft_test=sft, pref_test=pref,
                                 retriever=retriever,
                                 rag_models=tuple(models if rag_models is None else rag_models),
                                 seq_len=seq_len, num_samples=num_samples,
                                 max_new_tokens=max_new_tokens, num_questions=num_questions,
                                 bertscore_model=bertscore_model,
                                 bertscore_layer=bertscore_layer,
                                 bertscore_baseline=bertscore_baseline, judge=judge,
                                 judge_template=judge_template, judge_kwargs=judge_kwargs,
                                 judge_systems=judge_systems,
                                 mesh=sharding.make_mesh(mesh or sharding.MeshSpec()),
                                 rules=rules, teacher_forced=teacher_forced,
                                 yes_no_test=yes_no,
                                 yes_no_instruction=yes_no_instruction,
                                 yes_no_max_new_tokens=yes_no_max_new_tokens,
                                 base_model=base_model, oracle=oracle)
        if distributed.is_main():
            atomic_write_json(os.path.join(output_dir, "report.json"), report)
            print(open(os.path.join(output_dir, "report.md")).read())
    return 0
