"""A recipe's held-out split, recorded so a resumed run cannot move trained records into it.

A recipe splits its records into training and held-out sets from parameters (a held-out
fraction, test files, a number of evaluation queries). Rerun in the same folder with other
parameters, the new held-out set would hold records that the completed stages trained on,
and the report would score them as unseen. `check_split` records the parameters in
<output_dir>/split.json and refuses a change once a stage that trains on the split has begun.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax import distributed
from align_jax.atomic import atomic_write_json
from align_jax.train.status import read_json

SPLIT_FILE = "split.json"


def check_split(output_dir: str, params: Mapping[str, Any], *, recipe: str,
                stages: Sequence[str]) -> None:
    """Records the split parameters, or refuses when they changed under trained stages.

    Args:
      output_dir: the recipe's run folder.
      params: parameter name -> value (JSON-able) that decide the held-out split.
      recipe: the gin name of the recipe function, for the message ("value_alignment").
      stages: sub-folders of output_dir whose training used the split; any that exists
        makes a change an error (before them, a change just replaces the record).
    Raises:
      ValueError naming the first changed parameter with its old and new value.
    """
    path = os.path.join(output_dir, SPLIT_FILE)
    params = json.loads(json.dumps(dict(params)))
    old = read_json(path)
    trained = [s for s in stages if os.path.isdir(os.path.join(output_dir, s))]
    if old is not None and trained:
        changed = [k for k in sorted(set(old) | set(params)) if old.get(k) != params.get(k)]
        if changed:
            k = changed[0]
            raise ValueError(
                f"{path}: {recipe}.{k} was {old.get(k)!r} when {'/'.join(trained)} trained, "
                f"now {params.get(k)!r}: the held-out set would hold records those stages "
                f"trained on; use the original {k} or a new output_dir"
                + (f" (also changed: {changed[1:]})" if len(changed) > 1 else ""))
    distributed.barrier(f"align_jax.split:{output_dir}")  # every process read it first
    if distributed.is_main() and old != params:
        atomic_write_json(path, params)
