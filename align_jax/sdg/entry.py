"""`align-jax sdg`: synthetic data generation with a teacher, configured by gin.

    align-jax sdg --gin_file=configs/runs/sdg_document.gin \
      --gin_param="entry.sdg_main.teacher='openai:http://127.0.0.1:8000/v1'" --output_dir=runs/sdg
"""

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax import distributed
from align_jax.run_lock import run_lock
from align_jax.runinfo import run_folder
from align_jax.sdg import pipeline
from align_jax.sdg.backends import TeacherError, make_teacher
from align_jax.sdg.store import clear_run
from align_jax.tokenizer import load_tokenizer

TASKS = ("document", "aligner", "principles")


def sdg_main(*, output_dir: str, task: str = "document", teacher: str | None = None,
             teacher_kwargs: Mapping[str, Any] | None = None, documents: Sequence[str] = (),
             tokenizer: str | None = None, keyword: str = "policies", nex: int = 5,
             chunk_tokens: int = 512, overlap: int = 64,
             stages: Sequence[str] = ("instruct", "preference"), rounds: int = 1,
             yes_no_config=None, concurrency: int = 8,
             templates: Mapping[str, str] | None = None, principles_task: str | None = None,
             num_principles: int = 2, principles_file: str | None = None,
             max_questions: int | None = None, seed: int = 0, progress: bool = True,
             overwrite: bool = False) -> int:
    """Runs one SDG task into output_dir (resuming a killed run there); returns an exit code.

    Args:
      output_dir: the run folder (records, manifest, rejects, summary.json).
      task: "document" (D_sft + D_pref from documents), "aligner" (red-teaming questions,
        aligner triples and inspector records) or "principles" (SAMI constitutions).
      teacher: "openai:<base URL>" or "local:<HF checkpoint dir>".
      teacher_kwargs: backend options (api_key, concurrency, timeout, max_retries, ...).
      documents: files or folders for task "document".
      tokenizer: tokenizer used for chunking; default the teacher's token counter.
      keyword, nex, chunk_tokens, overlap, stages, rounds: task "document" settings
        (stages: "instruct", "preference", "yes_no"; see `pipeline.run_document_sdg`).
      yes_no_config: `align_jax.sdg.yes_no.YesNoConfig` of the "yes_no" stage.
      concurrency: prompts per teacher call.
      templates: template overrides by role (names or paths of template files).
      principles_task, num_principles, principles_file: task "principles" settings.
      max_questions: cap on aligner questions.
      seed: global seed (a resumed run with the same seed writes the same records).
      progress: progress bar.
      overwrite: start over: remove what an earlier SDG run wrote in output_dir (CLI
        --overwrite), e.g. to change the teacher, which a resumed run refuses.
    """
    if task not in TASKS:
        raise ValueError(f"sdg_main.task={task!r}: choose one of {TASKS}")
    if teacher is None and not (task == "principles" and principles_file):
        raise ValueError("sdg_main.teacher is not set: give 'openai:<base URL>' or "
                         "'local:<HF checkpoint dir>'")
    # Before anything is written: a second sdg on a folder in use refuses, the first one's
    # records stay as they are.
    with run_lock(output_dir if distributed.is_main() else None), run_folder(output_dir):
        if overwrite:
            clear_run(output_dir)
        try:
            t = make_teacher(teacher, **dict(teacher_kwargs or {})) if teacher else None
            if task == "document":
                if not documents:
                    raise ValueError("sdg_main.documents is empty: name the value documents")
                tok = None
                if tokenizer:
                    tok = load_tokenizer(tokenizer)
                pipeline.run_document_sdg(list(documents), output_dir, teacher=t, tokenizer=tok,
                                          nex=nex, keyword=keyword, templates=templates,
                                          chunk_tokens=chunk_tokens, overlap=overlap,
                                          seed=seed, stages=tuple(stages), rounds=rounds,
                                          yes_no_config=yes_no_config,
                                          concurrency=concurrency, progress=progress)
            elif task == "aligner":
                pipeline.run_aligner_sdg(output_dir, teacher=t, seed=seed, templates=templates,
                                         concurrency=concurrency, max_questions=max_questions,
                                         progress=progress)
            else:
                pipeline.run_principles_sdg(output_dir, teacher=t, task=principles_task,
                                            principles=num_principles,
                                            principles_file=principles_file, seed=seed,
                                            templates=templates)
        except TeacherError as e:
            print(f"align-jax sdg: teacher {teacher} failed: {e}", file=sys.stderr)
            return 1
    return 0
