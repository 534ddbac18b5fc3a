"""Load value documents (txt, md, html, pdf) and cut them into token-bounded chunks.

A chunk is a slice of the document's normalised text, so its char span is exact. Cuts
fall on paragraph boundaries where possible, then sentence boundaries, then word
boundaries; only a single word longer than the budget is cut mid-word. Chunk ids hash
the chunk text alone, so the same passage gets the same id wherever the file lives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html.parser
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
PDF_SUFFIXES = (".pdf",)


class Encoder(Protocol):
    """Anything that turns text into token ids (align_jax.tokenizer.Tokenizer, HF tokenizers)."""

    def encode(self, text: str) -> list[int]:
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Document:
    """A loaded document: `text` is normalised (see `normalize_whitespace`)."""
    source: str
    text: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chunk:
    """A passage of a document; `text == document.text[start:end]`."""
    id: str
    source: str
    text: str
    start: int
    end: int
    num_tokens: int


def chunk_id(text: str) -> str:
    """Stable content id of a chunk: the first 16 hex digits of sha256(text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def normalize_whitespace(text: str) -> str:
    """Unify newlines, squeeze runs of spaces, keep paragraph breaks as one blank line.

    Args:
        text: raw text.
    Returns:
        Text whose paragraphs are separated by exactly "\\n\\n", with no trailing spaces,
        no control characters other than newline, and no leading/trailing blank lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    text = text.replace("\u00a0", " ").replace("\u200b", "")
    # Control characters (other than \n and \t) come from PDFs and break JSON-minded teachers.
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", " ", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


class _HTMLText(html.parser.HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template", "head", "svg"})
    _BLOCK = frozenset({
            "p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
            "table", "section", "article", "header", "footer", "blockquote", "pre", "hr",
            "dd", "dt", "title", "main", "nav", "aside", "figure", "figcaption"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skip_depth:
            # Inside a block, source newlines are layout, not paragraph breaks.
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page (script/style dropped), blocks as paragraphs."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return normalize_whitespace("".join(parser.parts))


def _read_pdf(path: str) -> str:
    import pypdf  # optional: only PDF inputs pay for it
    try:
        reader = pypdf.PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged files.
        raise ValueError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from e
    return "\n\n".join(pages)


def load_document(path: str | os.PathLike) -> Document:
    """Read one document and normalise its whitespace.

    Args:
        path: a .txt/.md (read as UTF-8), .html/.htm (visible text) or .pdf file.
    Returns:
        Document(source=str(path), text=normalised text).
    Raises:
        ValueError naming the file for unknown suffixes, undecodable text, bad PDFs and
        documents without any text.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PDF_SUFFIXES:
        raw = _read_pdf(path)
    elif suffix in TEXT_SUFFIXES or suffix in HTML_SUFFIXES:
        try:
            with open(path, encoding="utf-8-sig") as f:
                raw = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
        if suffix in HTML_SUFFIXES:
            raw = html_to_text(raw)
    else:
        raise ValueError(
                f"{path}: unsupported document type {suffix!r}; expected one of "
                f"{TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES}")
    text = normalize_whitespace(raw)
    if not text:
        raise ValueError(f"{path}: document has no text")
    return Document(source=path, text=text)


def load_documents(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """`load_document` over several paths; a directory contributes its supported files."""
    out = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if os.path.splitext(n)[1].lower()
                                          in TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES)
            out.extend(load_document(os.path.join(path, n)) for n in names)
        else:
            out.append(load_document(path))
    return out


# ---------------------------------------------------------------------------- chunking

_PARAGRAPH = re.compile(r"\n\n+")
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) then space.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD = re.compile(r"\S+")


def _spans_between(text: str, start: int, end: int, separator: re.Pattern) -> list[tuple[int, int]]:
    spans, pos = [], start
    for m in separator.finditer(text, start, end):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < end:
        spans.append((pos, end))
    return spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _pieces(text: str, encoder: Encoder, max_tokens: int) -> list[tuple[int, int, int]]:
    """Smallest-needed units (start, end, tokens), each within max_tokens."""
    out = []

    def count(s, e):
        return len(encoder.encode(text[s:e]))

    def split(s, e, level):
        n = count(s, e)
        if n <= max_tokens:
            out.append((s, e, n))
            return
        if level == 0:
            parts = _spans_between(text, s, e, _SENTENCE_END)
        elif level == 1:
            parts = [(m.start(), m.end()) for m in _WORD.finditer(text, s, e)]
        else:
            parts = []
        if len(parts) > 1:
            # Pack consecutive sub-parts greedily so sentences/words are not each a piece.
            cur_s = cur_e = None
            for ps, pe in parts:
                if cur_s is None:
                    cur_s, cur_e = ps, pe
                elif count(cur_s, pe) <= max_tokens:
                    cur_e = pe
                else:
                    split(cur_s, cur_e, level + 1)
                    cur_s, cur_e = ps, pe
            split(cur_s, cur_e, level + 1)
            return
        if level < 2:
            split(s, e, level + 1)
            return
        # A single word over budget: cut characters, the only mid-word cut we make.
        pos = s
        while pos < e:
            lo, hi = pos + 1, e
            while lo < hi:  # largest end with count <= max_tokens
                mid = (lo + hi + 1) // 2
                if count(pos, mid) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            if count(pos, lo) > max_tokens:
                raise ValueError(
                        f"a single character at offset {pos} encodes to more than "
                        f"{max_tokens} tokens")
            out.append((pos, lo, count(pos, lo)))
            pos = lo

    for ps, pe in _spans_between(text, 0, len(text), _PARAGRAPH):
        ps, pe = _strip_span(text, ps, pe)
        if pe > ps:
            split(ps, pe, 0)
    return out


def max_chunk_tokens(*, chunk_tokens: int, context_length: int | None = None,
                                          reserved_tokens: int = 0) -> int:
    """The chunk budget that keeps chunk + template + generation within the context.

    Args:
        chunk_tokens: the wanted chunk size.
        context_length: the teacher's context window; None means unbounded.
        reserved_tokens: template tokens plus the generation budget (max new tokens).
    Returns:
        min(chunk_tokens, context_length - reserved_tokens).
    Raises:
        ValueError if no chunk of even one token fits.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if context_length is None:
        return chunk_tokens
    room = context_length - reserved_tokens
    if room < 1:
        raise ValueError(
                f"no room for a chunk: teacher context {context_length} tokens, template + "
                f"generation budget {reserved_tokens} tokens; use a teacher with a longer context, "
                f"a shorter template or fewer max_tokens")
    return min(chunk_tokens, room)


def chunk_document(document: Document, encoder: Encoder, *, chunk_tokens: int,
                                      overlap: int = 0, context_length: int | None = None,
                                      reserved_tokens: int = 0) -> list[Chunk]:
    """Cut a document into chunks of at most `chunk_tokens` tokens with token overlap.

    Args:
        document: from `load_document`.
        encoder: anything with encode(text) -> list[int].
        chunk_tokens: upper bound on tokens per chunk.
        overlap: about this many tokens of whole trailing pieces (sentences/paragraphs) of
            a chunk are repeated at the start of the next one; never more than `overlap`.
        context_length, reserved_tokens: when given, chunks are also bounded by
            context_length - reserved_tokens (see `max_chunk_tokens`), so chunk + template +
            generation budget always fits the teacher.
    Returns:
        Chunks in document order; each satisfies len(encoder.encode(chunk.text)) <= bound.
    """
    budget = max_chunk_tokens(chunk_tokens=chunk_tokens, context_length=context_length,
                                                        reserved_tokens=reserved_tokens)
    if overlap < 0 or overlap >= budget:
        raise ValueError(f"overlap must be in [0, {budget}), got {overlap}")
    text = document.text
    pieces = _pieces(text, encoder, budget)
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j = i + 1
        # Tokens of a join can differ from the sum of parts (merges across boundaries), so
        # the joined slice is re-encoded rather than trusted.
        while j < len(pieces) and len(encoder.encode(text[pieces[i][0]:pieces[j][1]])) <= budget:
            j += 1
        start, end = pieces[i][0], pieces[j - 1][1]
        body = text[start:end]
        chunks.append(Chunk(id=chunk_id(body), source=document.source, text=body, start=start,
                                                end=end, num_tokens=len(encoder.encode(body))))
        if j >= len(pieces):
            break
        # Step back over trailing pieces that fit in the overlap, but always advance.
        k = j
        while overlap and k - 1 > i and len(encoder.encode(text[pieces[k - 1][0]:end])) <= overlap:
            k -= 1
        i = k
    return chunks


def chunk_documents(documents: Sequence[Document], encoder: Encoder, **kwargs) -> list[Chunk]:
    """`chunk_document` over several documents; repeated passages (same id) kept once."""
    seen, out = set(), []
    for doc in documents:
        for chunk in chunk_document(doc, encoder, **kwargs):
            if chunk.id not in seen:
                seen.add(chunk.id)
                out.append(chunk)
    return out
