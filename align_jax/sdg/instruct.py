"""Instruct data (D_sft) from document chunks: questions by sampling, answers greedily.

Per chunk the teacher writes `nex` varied, situation-style questions (nucleus sampling),
then answers each from the chunk alone (greedy), giving SFT records
{prompt, completion, chunk_id, source}. All chunks of a batch share one teacher call per
step, so a batch of B chunks costs two calls.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from align_jax.data.documents import Chunk
from align_jax.sdg import parsing
from align_jax.sdg.store import UnitResult, derive_seed
from align_jax.sdg.teacher import Teacher, ask
from align_jax.sdg.templates import Template, resolve_templates

STAGE = "instruct"
TEMPLATES = {"instruct_questions": "instruct_questions", "instruct_answer": "instruct_answer"}
_ANSWER_LABEL = re.compile(r"^\s*\**\s*answer\s*\**\s*:\s*", re.I)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstructConfig:
    """Sampling settings of the instruct stage (the paper uses nex=5)."""
    nex: int = 5
    keyword: str = "policies"
    question_temperature: float = 0.8
    question_top_p: float = 0.95
    question_max_tokens: int = 512
    answer_max_tokens: int = 384
    use_chat: bool = True


def unit_id(chunk: Chunk) -> str:
    """The work unit of this stage for a chunk."""
    return f"{STAGE}/{chunk.id}"


def fits(teacher: Teacher, prompt: str, max_tokens: int) -> bool:
    """Whether prompt + generation budget fit the teacher's context."""
    return teacher.count_tokens(prompt) + max_tokens <= teacher.context_length


def generate_instruct(teacher: Teacher, chunks: Sequence[Chunk], *, seed: int,
                      config: InstructConfig = InstructConfig(),
                      templates: Mapping[str, str | Template] | None = None) -> list[UnitResult]:
    """SFT records for a batch of chunks.

    Args:
      teacher: any Teacher.
      chunks: the batch; one unit per chunk.
      seed: the batch seed (the pipeline derives it from the global seed and unit ids).
      config: sampling settings.
      templates: overrides for "instruct_questions" / "instruct_answer" (name, path or
        Template).
    Returns:
      One UnitResult per chunk, in order, with kind "sft" records and rejects.
    """
    t = resolve_templates(TEMPLATES, templates)
    q_tpl = t["instruct_questions"].require(["passage", "nex"])
    a_tpl = t["instruct_answer"].require(["passage", "question"])
    results = [UnitResult(unit=unit_id(c)) for c in chunks]
    prompts = [q_tpl.render(passage=c.text, nex=config.nex, keyword=config.keyword)
               for c in chunks]
    structured = bool(getattr(teacher, "applies_constraints", False))
    outs = ask(teacher, prompts, use_chat=config.use_chat,
               temperature=config.question_temperature, top_p=config.question_top_p,
               max_tokens=config.question_max_tokens, seed=derive_seed(seed, "questions"),
               constraint=q_tpl.output_constraint(nex=config.nex) if structured else None,
               owners=results)
    # JSON lines written under the template's constraint are read with json.loads; anything
    # else (no constraint, a list format, an endpoint that refused it) tolerantly.
    applied = structured and getattr(teacher, "applies_constraints", False) \
        and q_tpl.constraint is not None
    pending = []  # (result index, question, prompt)
    for i, (chunk, out) in enumerate(zip(chunks, outs)):
        results[i].calls += 1
        strict = applied and out.lstrip().startswith("{")
        items, rejects = (parsing.json_lines(out, required=("question",)) if strict else
                          parsing.parse_json_records(out, required=("question",),
                                                     list_key="question"))
        for r in rejects:
            results[i].reject(r["reason"], r["text"], step="questions")
        for n, item in enumerate(items):
            question = item["question"]
            if n >= config.nex:
                results[i].reject("extra_question", question, step="questions")
                continue
            problem = parsing.text_problem(question, markers=("{passage}", "Passage:"),
                                           echoes=q_tpl.example_values)
            if problem:
                results[i].reject(problem, question, step="questions")
                continue
            prompt = a_tpl.render(passage=chunk.text, question=question)
            if not fits(teacher, prompt, config.answer_max_tokens):
                results[i].reject("prompt_too_long", question, step="answer")
                continue
            pending.append((i, question, prompt))
    answers = ask(teacher, [p for _, _, p in pending], use_chat=config.use_chat,
                  temperature=0.0, max_tokens=config.answer_max_tokens,
                  seed=derive_seed(seed, "answers"),
                  constraint=a_tpl.output_constraint() if structured else None,
                  owners=[results[i] for i, _, _ in pending])
    for (i, question, _), answer in zip(pending, answers):
        results[i].calls += 1
        answer = _ANSWER_LABEL.sub("", answer).strip()
        problem = parsing.text_problem(answer, markers=("Question:", "{passage}", "{question}"))
        if problem:
            results[i].reject(problem, answer, step="answer", question=question)
            continue
        results[i].add("sft", {"prompt": question, "completion": answer,
                               "chunk_id": chunks[i].id, "source": chunks[i].source})
    return results
