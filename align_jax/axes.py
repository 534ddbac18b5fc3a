"""The logical axis vocabulary and the one-letter shape legend.

Models, losses and the sampler name tensor dimensions only with the logical axes below;
`align_jax.sharding` alone maps them onto mesh axes. Tensor variables carry a shape suffix
built from the one-letter legend (``x_BTD``), and einsum strings use the same letters.

Legend:
  B  batch                      T  query length (tokens in this call)
  S  key/value length           D  embed (model width)
  N  query heads                K  key/value heads
  H  head dim                   F  mlp hidden
  V  vocab                      L  layers
  P  pair (chosen, rejected)    C  constitutions
  G  query heads per key/value head (N = K * G)
  R  LoRA rank                  A  tokens of a scored continuation
  E  experts                    k  experts per token
  Q  slots per expert (capacity)
  b  key/value slots of one attention block (blockwise attention)
  c  vocabulary entries of one chunk (chunked log-probs)

Every letter of every einsum string in align_jax/ is in this legend (tests/test_axes_legend.py).
"""

BATCH = "batch"
SEQ = "seq"
KV_SEQ = "kv_seq"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
# The experts of a mixture-of-experts layer: the presets shard it over data/fsdp (expert
# parallelism), each device holding and running a share of the experts.
EXPERTS = "experts"
# The low-rank axis of LoRA adapters: no preset maps it, so it stays replicated.
LORA_RANK = "lora_rank"
