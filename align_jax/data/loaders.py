"""grain loaders: deterministic, resumable, sharded streams of fixed-shape batches.

Records are loaded, validated and tokenised up front (so bad input and the truncation report
surface before the first step, never in the middle of a run); grain then orders the examples,
shuffled by `seed` and reshuffled each epoch. Batches consume a contiguous run of that order (an
example that does not fit the current batch opens the next one), so the whole loader state is
grain's index into the order and a resumed loader yields exactly the batches of the
uninterrupted one.

Multi-host: every process walks the same global order and builds the same global batch, then
keeps its own rows. So each process runs the same number of steps, and the global batch is the
one a single process would build, whatever the process count.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np

from align_jax.data import batching
from align_jax.data.formats import DataFormat, get_format
from align_jax.data.formatting import TruncationReport, format_records
from align_jax.data.sources import LoadReport, Skipped, load_records, mixture_parts

_LOG = logging.getLogger(__name__)


class _BatchIterator(grain.DatasetIterator):
    """Groups the parent's examples into batches; `start()` opens a batch and returns its `add`,
    which takes the next example or answers False when it belongs to the next batch."""

    def __init__(self, parent, *, start, build, batch_size, drop_remainder):
        super().__init__(parent)
        self._start, self._build = start, build
        self._batch_size, self._drop_remainder = batch_size, drop_remainder
        # An example read but left for the next batch, with the parent state from before reading it.
        self._pending = None

    def __next__(self):
        items, add = [], self._start()
        while True:
            if self._pending is not None:
                item, state = self._pending
                self._pending = None
            else:
                state = self._parent.get_state()
                try:
                    item = next(self._parent)
                except StopIteration:
                    break
            if not add(item):
                self._pending = (item, state)
                break
            items.append(item)
        if not items or (self._drop_remainder and len(items) < self._batch_size):
            raise StopIteration
        return self._build(items)

    def get_state(self):
        if self._pending is not None:
            return {"parent": self._pending[1]}
        return {"parent": self._parent.get_state()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = None


class _BatchIterDataset(grain.IterDataset):

    def __init__(self, parent, **kwargs):
        super().__init__(parent)
        self._kwargs = kwargs

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), **self._kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Grouping:
    start: Callable[[], Callable[[Any], bool]]
    build: Callable[[list], dict[str, np.ndarray]]
    drop_remainder: bool


def _padded(build, batch_size, drop_remainder):
    def start():
        count = 0

        def add(_):
            nonlocal count
            count += 1
            return count <= batch_size

        return add

    return _Grouping(start=start, build=build, drop_remainder=drop_remainder)


def _packed(length, build, batch_size, seq_len, max_items=None):
    def start():
        # The builder repeats this same deterministic first-fit over the batch's items.
        packer = batching.FirstFitPacker(num_rows=batch_size, seq_len=seq_len,
                                         max_items_per_row=max_items)
        return lambda item: packer.add(length(item)) is not None

    return _Grouping(start=start, build=build, drop_remainder=False)


def _grouping(fmt: DataFormat, *, pack, batch_size, seq_len, pad_id, max_pairs, drop_remainder):
    kw = {"batch_size": batch_size, "seq_len": seq_len, "pad_id": pad_id}
    if not pack:
        return _padded(lambda xs: fmt.build(xs, **kw), batch_size, drop_remainder)
    if fmt.build_packed is None:
        raise ValueError(f"kind={fmt.name!r} is padded only (pack=False)")
    if fmt.max_items_per_row:
        return _packed(fmt.pack_length,
                       lambda xs: fmt.build_packed(xs, max_pairs=max_pairs, **kw),
                       batch_size, seq_len, max_items=max_pairs)
    return _packed(fmt.pack_length, lambda xs: fmt.build_packed(xs, **kw), batch_size, seq_len)


def _load_sources(parts, *, fmt, tokenizer, seq_len, truncation, pack, chat_template, on_error,
                  split, data_dir):
    """Each part's examples, read and checked by itself (its own file and line in any error),
    and the merged load and truncation reports."""
    load_report, trunc_report = LoadReport(), TruncationReport(policy=truncation, seq_len=seq_len)
    per_source = []
    for spec, _ in parts:
        records, loaded = load_records(spec, schema=fmt.schema, on_error=on_error, split=split,
                                       data_dir=data_dir)
        examples, cut, skipped = format_records(
            records, kind=fmt.kind, tokenizer=tokenizer, seq_len=seq_len, truncation=truncation,
            packed=pack, chat_template=chat_template, on_error=on_error)
        _merge_reports(load_report, trunc_report, loaded, cut, skipped)
        if not examples:
            where = "" if len(parts) == 1 else f" in {spec!r}"
            raise ValueError(f"no examples left to train on{where}:\n"
                             f"{load_report.summary()}\n{trunc_report.summary()}")
        per_source.append(examples)
    return per_source, load_report, trunc_report


def _merge_reports(load_report, trunc_report, loaded, cut, skipped):
    load_report.num_read += loaded.num_read
    load_report.skipped += loaded.skipped + [Skipped(where=w, reason=r) for w, r in skipped]
    trunc_report.num_examples += cut.num_examples
    trunc_report.cut += cut.cut
    trunc_report.dropped += cut.dropped


class _EpochShuffle(grain.MapDataset):
    """Shuffles each window of `window` consecutive elements of an endless parent (one epoch
    of a mixture), with a permutation drawn from (seed, epoch); `num_epochs` windows, or
    endless when None. Index -> element stays a pure function, so grain's resume is exact."""

    def __init__(self, parent, *, window: int, seed: int, num_epochs: int | None,
                 shuffle: bool):
        super().__init__(parent)
        self._window, self._seed, self._shuffle = window, seed, shuffle
        self._length = sys.maxsize if num_epochs is None else window * num_epochs
        self._perm: tuple[int, np.ndarray | None] = (-1, None)

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, offset = divmod(index, self._window)
        if self._shuffle:
            if self._perm[0] != epoch:
                rng = np.random.default_rng([self._seed, epoch])
                self._perm = (epoch, rng.permutation(self._window))
            offset = int(self._perm[1][offset])
        return self._parent[epoch * self._window + offset]


def _mixture(per_source, parts, *, seed, shuffle, num_epochs):
    """Sources drawn by weight: each source shuffled and repeated on its own, interleaved in
    proportion by grain's `MapDataset.mix` (weights scaled to integers, the smallest to 100),
    and the interleaving shuffled within each epoch (as many draws as the sources hold), so
    the sources arrive in random order at the weights' rates. A small source with a large
    weight repeats within an epoch; a large one with a small weight is partly seen."""
    weights = [w for _, w in parts]
    _LOG.info("data mixture: %s", "; ".join(
        f"{spec} ({len(x)} examples, weight {w:g} = {100 * w / sum(weights):.1f}% of draws)"
        for (spec, w), x in zip(parts, per_source)))
    sources = []
    for i, examples in enumerate(per_source):
        ds = grain.MapDataset.source(examples)
        if shuffle:
            ds = ds.shuffle(seed=(seed + 1_000_003 * (i + 1)) % 2**32)
        sources.append(ds.repeat(None))
    mixed = grain.MapDataset.mix(sources, weights)
    return _EpochShuffle(mixed, window=sum(len(x) for x in per_source), seed=seed,
                         num_epochs=num_epochs, shuffle=shuffle)


def _shard_info(shard):
    if shard is not None:
        return shard
    return jax.process_index(), jax.process_count()


def _close(holder):
    iterator = holder.pop() if holder else None
    if hasattr(iterator, "close"):
        iterator.close()


class Loader:
    """An iterator of numpy batches with `get_state` / `set_state` for checkpoints.

    Attributes:
      load_report: records read and skipped (with file and line).
      truncation_report: examples cut or dropped by the truncation policy (with file and line).
      num_examples: examples per epoch (after truncation drops).
      max_pairs: M of packed preference batches (None otherwise).
    """

    def __init__(self, dataset, *, load_report, truncation_report, num_examples, max_pairs):
        self._dataset = dataset
        # A prefetch thread still running at interpreter exit aborts the process, so the
        # iterator is closed and released at exit (or by close()), while modules are still alive.
        self._holder = [iter(dataset)]
        self._finalizer = weakref.finalize(self, _close, self._holder)
        self.load_report: LoadReport = load_report
        self.truncation_report: TruncationReport = truncation_report
        self.num_examples = num_examples
        self.max_pairs = max_pairs

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    @property
    def _iterator(self):
        if not self._holder:
            raise ValueError("the loader is closed")
        return self._holder[0]

    def get_state(self) -> dict:
        """The position in the stream: a small JSON-serialisable dict to checkpoint."""
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        """Continues from a get_state() of a loader built with the same arguments."""
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops the prefetch thread, if any (also done at exit)."""
        self._finalizer()

    def summary(self) -> str:
        return f"{self.load_report.summary()}\n{self.truncation_report.summary()}"


def make_loader(records_or_spec: Any, *, kind: str | DataFormat, tokenizer, seq_len: int,
                batch_size: int, pack: bool = False, truncation: str = "truncate_prompt_left",
                seed: int = 0, num_epochs: int | None = 1, shuffle: bool = True,
                on_error: str = "raise", max_pairs: int | None = None,
                chat_template: bool = True, drop_remainder: bool = True,
                shard: tuple[int, int] | None = None, split: str | None = None,
                data_dir: str | None = None, prefetch: int = 0,
                annotate: Callable[[list], list] | None = None) -> Loader:
    """Builds a deterministic, resumable loader of Batches-contract numpy batches.

    Args:
      records_or_spec: anything `sources.load_records` takes (path, "hf:...", "tfds:...", a
        datasets.Dataset, a list of dicts or Records), or a mixture of specs
        (`sources.mixture_parts`: `[(spec, weight), ...]` or `"spec@weight,spec@weight"`),
        drawn by weight, an epoch being as many examples as the sources hold together.
      kind: the data format: a name in `formats.FORMATS` ("lm" (raw `text`), "sft",
        "preference", "kto", "sami") or a DataFormat record (an objective's own layout).
      tokenizer: a Tokenizer (align_jax.tokenizer contract).
      seq_len: T.
      batch_size: the global batch size; each of the process_count processes yields
        batch_size // process_count rows (its part of the global batch).
      pack: pack several sequences (lm, sft) or pairs (preference) per row; formats without
        a packed layout reject it.
      truncation: what to do with an example longer than seq_len (see formatting.truncate):
        "truncate_prompt_left", "truncate_completion", "drop" (skip it; counted and named in
        truncation_report) or "error" (stop, naming file and line).
      seed: shuffle seed; the same seed gives the same order.
      num_epochs: passes over the data; None repeats forever.
      shuffle: shuffle (reshuffled every epoch).
      on_error: "raise" stops on a bad record naming file and line; "skip" skips and reports it.
      max_pairs: M for packed preference (default: as many of the shortest pair as fit a row).
      chat_template: False renders prompts as plain text (base models).
      drop_remainder: drop a last, incomplete padded batch. Preference, KTO and SAMI batches have
        no row mask, so they require it.
      shard: (process_index, process_count); default jax's.
      split, data_dir: for hf / tfds specs.
      prefetch: batches built ahead on a background thread (0 = none); resuming stays exact.
      annotate: applied once to the tokenised examples before batching (e.g. to attach
        precomputed reference log-probs); must keep their order and count.
    Returns:
      A Loader.
    """
    fmt = get_format(kind)
    if not drop_remainder and not pack and not fmt.row_mask:
        raise ValueError(f"kind={fmt.name!r} padded batches need drop_remainder=True (no row mask)")
    index, count = _shard_info(shard)
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {count} processes")
    rows = slice(index * (batch_size // count), (index + 1) * (batch_size // count))

    parts = mixture_parts(records_or_spec)
    parts = [(records_or_spec, 1.0)] if parts is None else parts
    per_source, load_report, trunc_report = _load_sources(
        parts, fmt=fmt, tokenizer=tokenizer, seq_len=seq_len, truncation=truncation, pack=pack,
        chat_template=chat_template, on_error=on_error, split=split, data_dir=data_dir)
    examples = [x for source in per_source for x in source]
    if annotate is not None:
        # E.g. reference log-probs computed once over the dataset, before any batching.
        examples = list(annotate(examples))
        starts = np.cumsum([0] + [len(source) for source in per_source])
        per_source = [examples[a:b] for a, b in zip(starts[:-1], starts[1:])]
    packs_items = pack and fmt.max_items_per_row
    if packs_items and max_pairs is None:
        max_pairs = max(1, seq_len // min(fmt.pack_length(ex) for ex in examples))
    # Records lost are a warning; prompts cut by the truncation policy asked for are what the
    # run was told to do (the train summary lists them either way).
    if load_report.skipped or trunc_report.dropped:
        _LOG.warning("data: %s\n%s", load_report.summary(), trunc_report.summary())
    elif trunc_report.cut:
        _LOG.info("data: %s\n%s", load_report.summary(), trunc_report.summary())

    if len(parts) == 1:
        ds = grain.MapDataset.source(examples)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs)
    else:
        ds = _mixture(per_source, parts, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    # In-memory examples: no read threads, so the order never depends on scheduling.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    grouping = _grouping(fmt, pack=pack, batch_size=batch_size, seq_len=seq_len,
                         pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                         max_pairs=max_pairs, drop_remainder=drop_remainder)

    def build(items):
        return {k: v[rows] for k, v in grouping.build(items).items()}

    dataset = _BatchIterDataset(it_ds, start=grouping.start, build=build,
                                batch_size=batch_size, drop_remainder=grouping.drop_remainder)
    if prefetch:
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset,
                                                               prefetch_buffer_size=prefetch)
    return Loader(dataset, load_report=load_report, truncation_report=trunc_report,
                  num_examples=len(examples),
                  max_pairs=max_pairs if packs_items else None)

