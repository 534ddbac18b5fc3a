"""Runs document SDG with the scripted teacher; the resume tests start and kill it.

Usage: python run_scripted_sdg.py OUT_DIR DOCUMENT SEED DELAY
Prints "ready" once imports are done, so the killer can time its signal from there.
"""

import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

if __name__ == "__main__":
    # align_jax.data/__init__ pulls in grain (seconds of imports); SDG needs only the
    # documents submodule, so the subprocess registers the package without running it.
    import align_jax  # noqa: E402
    _pkg = types.ModuleType("align_jax.data")
    _pkg.__path__ = [os.path.join(os.path.dirname(align_jax.__file__), "data")]
    sys.modules.setdefault("align_jax.data", _pkg)

from scripted_teacher import ScriptedTeacher, WordTokenizer  # noqa: E402

from align_jax.sdg.pipeline import run_document_sdg  # noqa: E402

SETTINGS = dict(nex=3, keyword="policies", chunk_tokens=60, overlap=10, concurrency=2,
                stages=("instruct", "preference"), split_fractions=(0.6, 0.2, 0.2))


def main(out_dir, document, seed, delay):
    run_document_sdg([document], out_dir, teacher=ScriptedTeacher(delay=float(delay)),
                     tokenizer=WordTokenizer(), seed=int(seed), progress=False, verbose=False,
                     **SETTINGS)


if __name__ == "__main__":
    print("ready", flush=True)
    main(*sys.argv[1:])
