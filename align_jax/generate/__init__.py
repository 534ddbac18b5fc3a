"""Text generation: one jitted prefill and one jitted while_loop decode over a KV cache."""

from align_jax.generate.loop import (
    Completion,
    GenerationOutput,
    SamplingState,
    generate,
    generate_stream,
    jit_decode,
    jit_prefill,
    score_continuations,
    trace_counts,
)
from align_jax.generate.sampling import (
    SamplingFlags,
    SamplingParams,
    apply_repetition_penalty,
    make_sampling,
    sample,
)
from align_jax.generate.stop import cut_at_stop

__all__ = [
    "Completion", "GenerationOutput", "SamplingFlags", "SamplingParams", "SamplingState",
    "apply_repetition_penalty", "cut_at_stop", "generate", "generate_stream", "jit_decode",
    "jit_prefill", "make_sampling", "sample", "score_continuations", "trace_counts",
]
