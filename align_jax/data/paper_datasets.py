"""The SAMI paper's query sets, read through `datasets` in their published Hugging Face layouts.

  HH-RLHF (Anthropic/hh-rlhf)   one folder per subset (helpful-base, harmless-base, ...) with
                                train.jsonl.gz and test.jsonl.gz; each line {"chosen",
                                "rejected"}, dialogues "\\n\\nHuman: ...\\n\\nAssistant: ...". The
                                paper keeps only the first human turn and drops the labels.
  TL;DR comparisons             openai/summarize_from_feedback, config "comparisons" (on the
   (openai/summarize_from_      hub as its parquet export: comparisons/{train,validation}/
    feedback)                   0000.parquet); each row {"info": {"id", "post", "title",
                                "subreddit", ...}, "summaries", "choice", ...}, several rows
                                per post. The paper keeps the unique posts, in order.

`source` is a hub name or a local folder laid out the same way (a `git clone` of the dataset
repository, or the files copied); nothing here downloads unless `source` is a hub name.
The records have a `prompt` (the first human turn, or the post), so they are SAMI queries
(`methods.sami.sami(queries=...)`, or written out with `write_queries`); the TL;DR posts go
with `prompt_format='summary'`, the paper's summarization prompt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax.data.sources import DataError
from align_jax.jsonl import write_jsonl

HH_RLHF = "Anthropic/hh-rlhf"
HH_SUBSETS = ("helpful-base", "harmless-base")
TLDR = "openai/summarize_from_feedback"
# The hub keeps the comparisons as its parquet export on this revision (the main branch holds
# a loading script, which `datasets` no longer runs).
TLDR_REVISION = "refs/convert/parquet"


def _load(source: str, *, data_dir: str, split: str, revision: str | None):
    import datasets  # heavy, optional: only these loaders and the HF sources need it
    try:
        return datasets.load_dataset(source, data_dir=data_dir, split=split, revision=revision)
    except (FileNotFoundError, ValueError) as e:
        where = os.path.join(source, data_dir) if os.path.isdir(source) else \
            f"{source} (data_dir {data_dir!r})"
        raise DataError(f"{where}: cannot read split {split!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def first_human_turn(dialogue: str, *, where: str = "dialogue") -> str:
    """The first "Human:" turn of an HH-RLHF dialogue, stripped.

    Raises:
      DataError naming `where` when the text has no "Human:" turn.
    """
    start = dialogue.find("Human:")
    if start < 0:
        raise DataError(f"{where}: no 'Human:' turn in {dialogue[:60]!r}")
    rest = dialogue[start + len("Human:"):]
    end = rest.find("\n\nAssistant:")
    turn = (rest if end < 0 else rest[:end]).strip()
    if not turn:
        raise DataError(f"{where}: the first 'Human:' turn is empty")
    return turn


def hh_rlhf_first_turns(source: str = HH_RLHF, *, subsets: str | Sequence[str] = HH_SUBSETS,
                        split: str = "test", limit: int | None = None,
                        revision: str | None = None) -> list[dict[str, Any]]:
    """The first human turn of each HH-RLHF dialogue, per subset, in file order.

    Args:
      source: "Anthropic/hh-rlhf" or a local folder in its layout.
      subsets: one subset folder or several (the paper: helpful-base and harmless-base).
      split: "train" or "test" (the paper evaluates the first 250 test queries of each).
      limit: at most this many per subset (None: all).
      revision: a hub revision.
    Returns:
      [{"prompt", "subset", "index": row in the subset's split}], subset after subset.
    """
    out = []
    for subset in [subsets] if isinstance(subsets, str) else list(subsets):
        rows = _load(source, data_dir=subset, split=split, revision=revision)
        if "chosen" not in rows.column_names:
            raise DataError(f"{source}/{subset} [{split}]: no field 'chosen' (fields: "
                            f"{rows.column_names}); expected HH-RLHF's layout")
        n = len(rows) if limit is None else min(limit, len(rows))
        for i in range(n):
            text = rows[i]["chosen"]
            where = f"{source}/{subset}[{split}][{i}] field 'chosen'"
            if not isinstance(text, str):
                raise DataError(f"{where}: not a string")
            out.append({"prompt": first_human_turn(text, where=where), "subset": subset,
                        "index": i})
    return out


def tldr_posts(source: str = TLDR, *, split: str = "train", config: str = "comparisons",
               limit: int | None = None, revision: str | None = None) -> list[dict[str, Any]]:
    """The unique posts of the TL;DR comparisons, in first-seen order (the paper's queries).

    Args:
      source: "openai/summarize_from_feedback" or a local folder in its parquet layout.
      split: "train" or "validation" (the paper: the first 250 unique posts).
      config: the dataset's configuration folder ("comparisons").
      limit: at most this many unique posts (None: all).
      revision: a hub revision (default for the hub name: its parquet export).
    Returns:
      [{"prompt": the post, "id", "title", "subreddit"}].
    """
    if revision is None and not os.path.isdir(source):
        revision = TLDR_REVISION
    rows = _load(source, data_dir=config, split=split, revision=revision)
    if "info" not in rows.column_names:
        raise DataError(f"{source}/{config} [{split}]: no field 'info' (fields: "
                        f"{rows.column_names}); expected the TL;DR comparisons layout")
    out, seen = [], set()
    for i, info in enumerate(rows["info"]):
        where = f"{source}/{config}[{split}][{i}] field 'info'"
        if not isinstance(info, Mapping) or not isinstance(info.get("post"), str):
            raise DataError(f"{where}: needs a string 'post'")
        key = info.get("id") or info["post"]
        if key in seen:
            continue
        seen.add(key)
        out.append({"prompt": info["post"].strip(), "id": info.get("id"),
                    "title": info.get("title"), "subreddit": info.get("subreddit")})
        if limit is not None and len(out) >= limit:
            break
    return out


def write_queries(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """Writes query records (one JSON object a line) for `sami.queries` / `heldout_queries`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, [dict(r) for r in records])
    return path
