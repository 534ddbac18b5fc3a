"""Preference data (D_pref) from document chunks: values filter, then contrasting answers.

Per chunk the teacher first says whether the passage carries values at all (yes/no with
a reason, kept as a "values_filter" record). Chunks that pass get `nex` questions, each
with an answer faithful to the passage (chosen) and one that contradicts it (rejected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from align_jax.data.documents import Chunk
from align_jax.sdg import parsing
from align_jax.sdg.store import UnitResult, derive_seed, jaccard
from align_jax.sdg.teacher import Teacher, ask
from align_jax.sdg.templates import Template, resolve_templates

STAGE = "preference"
TEMPLATES = {"values_filter": "values_filter", "preference_pairs": "preference_pairs"}
_FIELDS = ("question", "faithful", "unfaithful")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceConfig:
    """Sampling settings of the preference stage."""
    nex: int = 5
    keyword: str = "policies"
    filter_max_tokens: int = 96
    pair_temperature: float = 0.8
    pair_top_p: float = 0.95
    pair_max_tokens: int = 1536
    # Pairs whose chosen and rejected are at least this similar (word-bigram Jaccard) are
    # dropped; None keeps them (minimal faithful/unfaithful contrasts are what DPO learns
    # from). Identical texts are always dropped.
    max_pair_similarity: float | None = 0.8
    use_chat: bool = True


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def unit_id(chunk: Chunk) -> str:
    """The work unit of this stage for a chunk."""
    return f"{STAGE}/{chunk.id}"


def generate_preference(teacher: Teacher, chunks: Sequence[Chunk], *, seed: int,
                        config: PreferenceConfig = PreferenceConfig(),
                        templates: Mapping[str, str | Template] | None = None
                        ) -> list[UnitResult]:
    """Values-filter decisions and preference records for a batch of chunks.

    Args:
      teacher: any Teacher.
      chunks: the batch; one unit per chunk.
      seed: the batch seed.
      config: sampling settings.
      templates: overrides for "values_filter" / "preference_pairs".
    Returns:
      One UnitResult per chunk with kinds "values_filter" ({chunk_id, source, passes,
      reason}) and "preference" ({prompt, chosen, rejected, chunk_id, source}).
    """
    t = resolve_templates(TEMPLATES, templates)
    f_tpl = t["values_filter"].require(["passage"])
    p_tpl = t["preference_pairs"].require(["passage", "nex"])
    results = [UnitResult(unit=unit_id(c)) for c in chunks]
    structured = bool(getattr(teacher, "applies_constraints", False))
    verdicts = ask(teacher, [f_tpl.render(passage=c.text, keyword=config.keyword) for c in chunks],
                   use_chat=config.use_chat, temperature=0.0,
                   max_tokens=config.filter_max_tokens, seed=derive_seed(seed, "filter"),
                   constraint=f_tpl.output_constraint() if structured else None,
                   owners=results)
    passing = []
    for i, (chunk, out) in enumerate(zip(chunks, verdicts)):
        results[i].calls += 1
        verdict, reason = parsing.parse_yes_no(out)
        results[i].add("values_filter", {"chunk_id": chunk.id, "source": chunk.source,
                                         "passes": verdict, "reason": reason})
        if verdict is None:
            results[i].reject("no_verdict", out, step="filter")
        elif verdict:
            passing.append(i)
    prompts = [p_tpl.render(passage=chunks[i].text, nex=config.nex, keyword=config.keyword)
               for i in passing]
    outs = ask(teacher, prompts, use_chat=config.use_chat, temperature=config.pair_temperature,
               top_p=config.pair_top_p, max_tokens=config.pair_max_tokens,
               seed=derive_seed(seed, "pairs"),
               constraint=p_tpl.output_constraint(nex=config.nex) if structured else None,
               owners=[results[i] for i in passing])
    # Under its JSON-lines constraint the output is read with json.loads, else tolerantly.
    strict = (structured and getattr(teacher, "applies_constraints", False)
              and p_tpl.constraint is not None)
    markers = ("{passage}", "Passage:", '"faithful"', '"unfaithful"')
    for i, out in zip(passing, outs):
        results[i].calls += 1
        items, rejects = (parsing.json_lines(out, required=_FIELDS) if strict else
                          parsing.parse_json_records(out, required=_FIELDS))
        for r in rejects:
            results[i].reject(r["reason"], r["text"], step="pairs")
        for n, item in enumerate(items):
            if n >= config.nex:
                results[i].reject("extra_question", item["question"], step="pairs")
                continue
            problem = next((p for p in (parsing.text_problem(item[f], markers=markers,
                                                             echoes=p_tpl.example_values)
                                        for f in _FIELDS) if p), None)
            if problem is None:
                if _same(item["faithful"], item["unfaithful"]):
                    problem = "chosen_equals_rejected"
                elif (config.max_pair_similarity is not None and jaccard(
                        item["faithful"], item["unfaithful"]) >= config.max_pair_similarity):
                    problem = "chosen_similar_to_rejected"
            if problem:
                results[i].reject(problem, item["question"], step="pairs")
                continue
            results[i].add("preference", {
                "prompt": item["question"], "chosen": item["faithful"],
                "rejected": item["unfaithful"], "chunk_id": chunks[i].id,
                "source": chunks[i].source})
    return results
