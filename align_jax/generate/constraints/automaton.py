"""Regex -> byte automaton (outlines-core) -> token masks for one tokenizer (numpy, here).

Two steps, both cached:

1. `byte_dfa(pattern)`: outlines-core compiles the regex (Rust `regex` syntax) into a DFA;
   we read it out byte by byte by indexing the 256 one-byte strings as a vocabulary. The
   pattern is followed by a sentinel character (U+FFFF) and a state accepts when the sentinel
   leads to a final state: outlines-core 0.2.14's token index drops a token that ends where a
   shorter prefix already matched (e.g. `(ab)+` cannot continue after "ab"), and with the
   sentinel no real prefix is ever a match, so no transition is dropped.
2. `compile_constraint(constraint, tokenizer)`: the token-level tables the decode loop needs:
   the byte DFA itself (the device walks a drawn token's bytes through it, so no
   state x token table is stored), and for each state the packed bit mask of the tokens that
   may come next (a token whose bytes keep the DFA alive, i.e. still able to reach an accepting
   state). Masks are computed once per class of states that no token can tell apart (states
   equivalent up to the longest token's length), by walking a trie of the vocabulary from
   every class at once; a string with maxLength 200 has ~2,600 DFA states but only a few
   hundred such classes.

Why not outlines-core's own token index: besides the dropped tokens above, a schema with a
200-character string has ~10M (state, token) transitions, which take seconds to export to
Python, and a dense table of them would not fit a device's memory sensibly.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import weakref

import numpy as np

SENTINEL = "\uffff"
_SENTINEL_BYTES = SENTINEL.encode()
DEAD = -1
# Tokens longer than this many bytes get their masks from a separate (exact) walk.
SHORT = 16


@dataclasses.dataclass(frozen=True, eq=False)
class ByteDFA:
    """A byte-level DFA: delta_QY[q, byte] is the next state or DEAD; state 0 is the start.
    Only states that can still reach an accepting state are kept."""

    delta_QY: np.ndarray  # int32 [Q, 256]
    accepting_Q: np.ndarray  # bool [Q]


@functools.lru_cache(maxsize=256)
def byte_dfa(pattern: str) -> ByteDFA:
    """Compiles a Rust-syntax regex into a pruned byte DFA.

    Raises:
      ValueError naming the pattern when it is invalid or matches nothing.
    """
    from outlines_core import Index, Vocabulary

    vocab = Vocabulary(256, {bytes([b]): [b] for b in range(256)})
    try:
        index = Index(f"(?:{pattern}){SENTINEL}", vocab)
    except ValueError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        try:
            re.compile(pattern)
        except re.error as py:
            reason = f"{reason}; Python's re: {py}"
        if "incompatible" in reason:
            reason = "no text matches it"
        raise ValueError(f"regex {_show(pattern)} cannot be used: {reason}") from None
    table = index.get_transitions()
    finals = set(index.get_final_states())
    start = index.get_initial_state()
    states = sorted(set(table) | {s for row in table.values() for s in row.values()} | {start},
                    key=lambda s: s != start)
    ids = {s: i for i, s in enumerate(states)}
    delta = np.full((len(states), 256), DEAD, np.int32)
    for s, row in table.items():
        for b, t in row.items():
            if b < 256:
                delta[ids[s], b] = ids[t]
    final = np.zeros(len(states), bool)
    final[[ids[s] for s in finals if s in ids]] = True
    # A state accepts when the sentinel's bytes lead it to a final state.
    cur = np.arange(len(states))
    for b in _SENTINEL_BYTES:
        cur = np.where(cur >= 0, delta[np.maximum(cur, 0), b], DEAD)
    accepting = (cur >= 0) & final[np.maximum(cur, 0)]
    live = _coreachable(delta, accepting)
    if not live[0]:
        raise ValueError(f"regex {_show(pattern)} cannot be used: no text matches it")
    keep = np.flatnonzero(live)
    remap = np.full(len(states) + 1, DEAD, np.int32)
    remap[keep] = np.arange(len(keep))
    delta = remap[np.where(delta >= 0, delta, len(states))][keep]
    return ByteDFA(delta_QY=delta, accepting_Q=accepting[keep])


def _coreachable(delta: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """States from which some accepting state can be reached."""
    src, byte = np.nonzero(delta >= 0)
    dst = delta[src, byte]
    order = np.argsort(dst, kind="stable")
    src, dst = src[order], dst[order]
    starts = np.searchsorted(dst, np.arange(len(delta) + 1))
    live = accepting.copy()
    frontier = np.flatnonzero(live)
    while frontier.size:
        preds = np.concatenate([src[starts[q]:starts[q + 1]] for q in frontier])
        preds = np.unique(preds)
        frontier = preds[~live[preds]]
        live[frontier] = True
    return live


def _show(pattern: str, n: int = 80) -> str:
    return repr(pattern if len(pattern) <= n else pattern[:n] + "...")


# ----------------------------------------------------------------------------- tokenizers


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table (byte-level BPE pieces)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _hf_pieces(tok) -> list[bytes | None]:
    """Bytes of each id of a Hugging Face tokenizer (None for special tokens)."""
    import json

    hf = tok._tok
    state = hf.backend_tokenizer.decoder
    decoder = json.loads(state.__getstate__()) if state is not None else {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    added = hf.added_tokens_decoder  # a property that builds a dict: read it once
    special = set(hf.all_special_ids) | {i for i, t in added.items() if t.special}
    pieces = hf.convert_ids_to_tokens(list(range(tok.vocab_size)))
    out: list[bytes | None] = []
    if "ByteLevel" in kinds:
        table = _gpt2_byte_decoder()
        for i, p in enumerate(pieces):
            if i in special or p is None:
                out.append(None)
            elif i in added:  # added normal tokens are stored as text
                out.append(p.encode())
            else:
                out.append(bytes(table[c] for c in p) if all(c in table for c in p)
                           else p.encode())
        return out
    if kinds & {"Metaspace", "ByteFallback", "Replace"}:
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.match(p or "")
            out.append(None if i in special or p is None else
                       bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode())
        return out
    raise ValueError(f"tokenizer {tok.path}: constrained generation supports byte-level BPE and "
                     f"sentencepiece-style tokenizers, not one whose decoder is "
                     f"{sorted(k for k in kinds if k)}")


def _sp_pieces(tok) -> list[bytes | None]:
    sp = tok._sp
    out: list[bytes | None] = []
    for i in range(tok.vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            out.append(None)
        elif sp.is_byte(i):
            out.append(bytes([int(_BYTE_PIECE.match(sp.id_to_piece(i)).group(1), 16)]))
        else:
            out.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TokenTable:
    """A tokenizer's tokens as bytes, and the trie the mask computation walks.

    pieces: bytes of each id (None: a special token, never allowed inside a constraint).
    bytes_VL, len_V: the same as a padded uint8 array [V, L] and lengths (0 for specials).
    """

    pieces: list[bytes | None]
    bytes_VL: np.ndarray
    len_V: np.ndarray
    # The trie of the pieces: node 0 is the root; node n is reached by byte_N[n]; its
    # children are children[child_starts[n]:child_starts[n + 1]].
    byte_N: np.ndarray
    children: np.ndarray
    child_starts: np.ndarray
    token_node_V: np.ndarray  # the node where each id's bytes end (-1: special or empty)
    tokens_at_node: np.ndarray  # an id whose bytes end at each node (-1: none)

    @property
    def max_len(self) -> int:
        return self.bytes_VL.shape[1]


def _build_table(pieces: list[bytes | None]) -> TokenTable:
    lens = np.asarray([len(p) if p else 0 for p in pieces], np.int32)
    width = max(1, int(lens.max()))
    bytes_vl = np.zeros((len(pieces), width), np.uint8)
    for i, p in enumerate(pieces):
        if p:
            bytes_vl[i, :len(p)] = np.frombuffer(p, np.uint8)
    # Trie nodes are the distinct non-empty prefixes: inserted in sorted order, a piece adds
    # a node for each of its prefixes longer than its common prefix with the one before.
    parent, byte, node_of = [0], [0], {}
    path: list[int] = [0]  # node of each prefix of the previous piece
    prev = b""
    for p in sorted({p for p in pieces if p}):
        k = 0
        while k < len(prev) and k < len(p) and prev[k] == p[k]:
            k += 1
        del path[k + 1:]
        for j in range(k, len(p)):
            parent.append(path[j])
            byte.append(p[j])
            path.append(len(parent) - 1)
        node_of[p], prev = path[len(p)], p
    parent_n, byte_n = np.asarray(parent, np.int64), np.asarray(byte, np.int64)
    token_node = np.asarray([node_of[p] if p else -1 for p in pieces], np.int64)
    order = np.argsort(parent_n[1:], kind="stable") + 1
    child_starts = np.searchsorted(parent_n[order], np.arange(len(parent_n) + 1))
    tokens_at_node = np.full(len(parent_n), -1, np.int64)
    valid = token_node >= 0
    tokens_at_node[token_node[valid]] = np.flatnonzero(valid)
    return TokenTable(pieces=pieces, bytes_VL=bytes_vl, len_V=lens, byte_N=byte_n,
                      children=order, child_starts=child_starts, token_node_V=token_node,
                      tokens_at_node=tokens_at_node)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def token_table(tokenizer) -> TokenTable:
    """The (cached) byte table of a tokenizer: byte-level BPE pieces map back to their bytes,
    sentencepiece pieces have '▁' as a space and <0xNN> byte-fallback pieces are that byte."""
    with _LOCK:
        table = _TABLES.get(tokenizer)
    if table is None:
        pieces = _sp_pieces(tokenizer) if hasattr(tokenizer, "_sp") else _hf_pieces(tokenizer)
        table = _build_table(pieces)
        with _LOCK:
            _TABLES[tokenizer] = table
    return table


# ----------------------------------------------------------------------------- masks


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledConstraint:
    """A constraint's tables for one tokenizer (host numpy; loop.py puts them on the device).

    delta_QY: int32 [Q, 256] byte DFA (DEAD = -1); state 0 is the start.
    accepting_Q: bool [Q].
    mask_id_Q: int32 [Q], the row of masks_MW holding the state's allowed tokens.
    masks_MW: uint32 [M, ceil(V/32)], bit t % 32 of word t // 32 set = token t allowed.
    """

    constraint: object
    table: TokenTable
    delta_QY: np.ndarray
    accepting_Q: np.ndarray
    mask_id_Q: np.ndarray
    masks_MW: np.ndarray

    def walk(self, tokens) -> int:
        """The state after `tokens` from the start (DEAD once a byte is refused)."""
        s = 0
        for t in tokens:
            for b in self.table.pieces[int(t)] or b"":
                s = int(self.delta_QY[s, b])
                if s == DEAD:
                    return DEAD
        return s

    def accepts(self, tokens) -> bool:
        """Whether `tokens` (no stop token) spell a complete match."""
        s = self.walk(tokens)
        return s != DEAD and bool(self.accepting_Q[s])

    def decode(self, tokens) -> str:
        """The text of `tokens` exactly as the automaton read it (their bytes as UTF-8); it can
        differ from tokenizer.decode, which may drop a leading space or tidy spaces."""
        data = b"".join(self.table.pieces[int(t)] or b"" for t in tokens)
        return data.decode("utf-8", errors="replace")


def _state_classes(delta: np.ndarray, depth: int, start: np.ndarray | None = None
                   ) -> np.ndarray:
    """Classes of states that no byte string of length <= depth tells apart (same liveness
    along every path): states of one class allow the same tokens of up to `depth` bytes.
    `start` is a coarser partition to refine (default: one class)."""
    # Bytes with equal columns behave alike everywhere: refine over one byte per column class.
    _, cols = np.unique(delta.T, axis=0, return_index=True)
    sub = delta[:, np.sort(cols)]
    cls = np.zeros(len(delta), np.int64) if start is None else start.astype(np.int64)
    n = int(cls.max()) + 1
    for _ in range(depth):
        # The signature (own class, class after each byte) folded column by column into a
        # dense id: exact, no hashing, and far cheaper than np.unique over rows.
        key = cls
        for j in range(sub.shape[1]):
            col = np.where(sub[:, j] >= 0, cls[np.maximum(sub[:, j], 0)], -1)
            _, key = np.unique(key * (n + 1) + col + 1, return_inverse=True)
        cls = key.reshape(-1)
        if int(cls.max()) + 1 == n:
            break
        n = int(cls.max()) + 1
    return cls


def _short_masks(dfa: ByteDFA, table: TokenTable, reps: np.ndarray, depth: int) -> np.ndarray:
    """Allowed tokens of at most `depth` bytes [R, V] (bool) from each representative state:
    a level-by-level walk of the vocabulary trie from all of them at once, keeping only the
    live (rep, node) pairs."""
    delta = dfa.delta_QY
    allowed = np.zeros((len(reps), len(table.pieces)), bool)
    at_rep, at_node, at_state = np.arange(len(reps)), np.zeros(len(reps), np.int64), reps
    tokens_at_node, valid = table.tokens_at_node, table.token_node_V >= 0
    order, starts = table.children, table.child_starts
    for _ in range(depth):
        counts = starts[at_node + 1] - starts[at_node]
        total = int(counts.sum())
        if total == 0:
            break
        rep = np.repeat(at_rep, counts)
        state = np.repeat(at_state, counts)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        child = order[np.repeat(starts[at_node], counts) + offsets]
        nxt = delta[state, table.byte_N[child]]
        keep = nxt >= 0
        at_rep, at_node, at_state = rep[keep], child[keep], nxt[keep]
        tok = tokens_at_node[at_node]
        hit = tok >= 0
        allowed[at_rep[hit], tok[hit]] = True
    # Ids that share their bytes with another id (a duplicate piece) follow that id.
    dup = valid & (tokens_at_node[np.maximum(table.token_node_V, 0)] != np.arange(len(valid)))
    if dup.any():
        allowed[:, np.flatnonzero(dup)] = allowed[:, tokens_at_node[table.token_node_V[dup]]]
    return allowed


def _long_masks(dfa: ByteDFA, table: TokenTable, reps: np.ndarray, ids: np.ndarray
                ) -> np.ndarray:
    """Allowed [R, len(ids)] for a few (long) tokens: their bytes walked from every rep."""
    state = np.broadcast_to(reps[:, None], (len(reps), len(ids))).copy()
    lens = table.len_V[ids]
    for k in range(int(lens.max(initial=0))):
        on = (k < lens)[None, :] & (state >= 0)
        b = table.bytes_VL[ids, k][None, :]
        state = np.where(on, dfa.delta_QY[np.maximum(state, 0), b], state)
    return state >= 0


def _pack(bits_RV: np.ndarray) -> np.ndarray:
    pad = -bits_RV.shape[1] % 32
    bits = np.pad(bits_RV, ((0, 0), (0, pad)))
    return np.packbits(bits, axis=1, bitorder="little").view("<u4").astype(np.uint32)


def compile_for(constraint, tokenizer) -> CompiledConstraint:
    """The (cached) tables of `constraint` for `tokenizer`; see the module docstring.

    Raises:
      ValueError when no token sequence of this tokenizer satisfies the constraint.
    """
    with _LOCK:
        per_tok = _COMPILED.setdefault(tokenizer, {})
        hit = per_tok.get(constraint)
    if hit is not None:
        return hit
    table = token_table(tokenizer)
    dfa = byte_dfa(constraint.pattern)
    # Tokens of up to SHORT bytes (all but a few hundred) are walked from one state per
    # depth-SHORT class; the few longer ones from one state per full-depth class.
    short = min(SHORT, table.max_len)
    cls_short = _state_classes(dfa.delta_QY, short)
    cls = _state_classes(dfa.delta_QY, table.max_len, start=cls_short)
    _, reps, inverse = np.unique(cls, return_index=True, return_inverse=True)
    _, short_reps, short_of = np.unique(cls_short, return_index=True, return_inverse=True)
    packed = _pack(_short_masks(dfa, table, short_reps, short))[short_of.reshape(-1)[reps]]
    long_ids = np.flatnonzero(table.len_V > short)
    if long_ids.size:
        ok = _long_masks(dfa, table, reps, long_ids)
        rows, cols = np.nonzero(ok)
        ids = long_ids[cols]
        np.bitwise_or.at(packed, (rows, ids // 32), (np.uint32(1) << (ids % 32)).astype(np.uint32))
    first = packed[inverse.reshape(-1)[0]]
    if not first.any() and not dfa.accepting_Q[0]:
        raise ValueError(f"{constraint.describe()}: no token of tokenizer {tokenizer.path} "
                         f"can start a matching text")
    rows = {}
    mask_of_rep = np.asarray([rows.setdefault(r.tobytes(), len(rows)) for r in packed], np.int32)
    masks = packed[np.unique(mask_of_rep, return_index=True)[1]]
    compiled = CompiledConstraint(
        constraint=constraint, table=table, delta_QY=dfa.delta_QY,
        accepting_Q=dfa.accepting_Q, mask_id_Q=mask_of_rep[inverse.reshape(-1)],
        masks_MW=masks)
    with _LOCK:
        per_tok[constraint] = compiled
    return compiled
