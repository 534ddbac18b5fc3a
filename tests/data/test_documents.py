"""Document loading (txt/md/html/pdf) and token-bounded chunking."""

import os
import re

import pytest

from align_jax.data import documents

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "values_document.md")


class WordEncoder:
    def encode(self, text):
        return [hash(t) % 1000 for t in re.findall(r"\w+|[^\w\s]", text)]


class CharEncoder:
    def encode(self, text):
        return [ord(c) for c in text]


class BigramEncoder:
    """Merges two adjacent words into one token, so a join can be shorter than its parts."""

    def encode(self, text):
        words = text.split()
        return [0] * ((len(words) + 1) // 2)


def _pdf_bytes(lines):
    """A minimal valid one-page PDF whose content stream shows `lines` in Helvetica."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for line in lines:
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"({escaped}) Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
            ).encode()
    return bytes(out)


def test_load_txt_and_md_normalise_whitespace(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("  Title\r\n\r\n\r\n\r\nFirst   line\t here.  \nsecond\x0cpage\u00a0x  \n",
                 encoding="utf-8")
    doc = documents.load_document(p)
    assert doc.text == "Title\n\nFirst line here.\nsecond\n\npage x"
    assert doc.source == str(p)
    md = documents.load_document(EXAMPLE)
    assert md.text.startswith("# Tidewater Cooperative Code of Conduct")
    assert "\n\n\n" not in md.text and "  " not in md.text


def test_load_html_drops_script_and_style(tmp_path):
    p = tmp_path / "a.html"
    p.write_text(
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<script>var secret = 1;</script><h1>Rules</h1><p>Be   honest &amp; fair.\nAlways.</p>"
        "<ul><li>One</li><li>Two</li></ul><noscript>enable js</noscript></body></html>",
        encoding="utf-8")
    text = documents.load_document(p).text
    assert text == "Rules\n\nBe honest & fair. Always.\n\nOne\n\nTwo"


def test_load_pdf_text_and_corrupt_pdf(tmp_path):
    p = tmp_path / "a.pdf"
    p.write_bytes(_pdf_bytes(["Members own the cooperative.", "Safety comes first."]))
    text = documents.load_document(p).text
    assert "Members own the cooperative." in text and "Safety comes first." in text
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    with pytest.raises(ValueError, match="bad.pdf"):
        documents.load_document(bad)


def test_load_errors_name_the_file(tmp_path):
    for name, data in (("x.docx", b"hi"), ("empty.txt", b"  \n\n "),
                       ("latin.txt", b"\xff\xfe\xfa")):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(name)):
            documents.load_document(p)


def test_load_documents_reads_folders(tmp_path):
    (tmp_path / "b.md").write_text("B text", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A text", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    docs = documents.load_documents([tmp_path])
    assert [d.text for d in docs] == ["A text", "B text"]


@pytest.mark.parametrize("encoder", [WordEncoder(), CharEncoder(), BigramEncoder()],
                         ids=["word", "char", "bigram"])
@pytest.mark.parametrize("chunk_tokens,overlap", [(60, 0), (120, 30), (400, 100)])
def test_chunks_are_bounded_exact_slices_that_cover_the_document(encoder, chunk_tokens, overlap):
    if isinstance(encoder, CharEncoder):
        chunk_tokens *= 5
        overlap *= 5
    doc = documents.load_document(EXAMPLE)
    chunks = documents.chunk_document(doc, encoder, chunk_tokens=chunk_tokens, overlap=overlap)
    assert len(chunks) > 1
    covered = [False] * len(doc.text)
    for c in chunks:
        assert c.text == doc.text[c.start:c.end]
        assert len(encoder.encode(c.text)) == c.num_tokens <= chunk_tokens
        assert c.id == documents.chunk_id(c.text) and c.source == doc.source
        for k in range(c.start, c.end):
            covered[k] = True
    # Everything but inter-paragraph whitespace is inside some chunk.
    assert all(covered[k] or doc.text[k].isspace() for k in range(len(doc.text)))
    starts = [c.start for c in chunks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    # Overlap never exceeds the budget and is zero when not asked for.
    for a, b in zip(chunks, chunks[1:]):
        shared = doc.text[b.start:a.end] if b.start < a.end else ""
        assert len(encoder.encode(shared)) <= overlap
        if overlap == 0:
            assert b.start >= a.end


def test_chunk_boundaries_prefer_paragraphs_then_sentences():
    paragraphs = [" ".join(f"p{p}s{s} word word." for s in range(4)) for p in range(6)]
    doc = documents.Document(source="mem", text="\n\n".join(paragraphs))
    enc = WordEncoder()
    per_paragraph = len(enc.encode(paragraphs[0]))
    # Room for two paragraphs: every cut falls between paragraphs.
    chunks = documents.chunk_document(doc, enc, chunk_tokens=2 * per_paragraph + 1)
    assert [c.text for c in chunks] == ["\n\n".join(paragraphs[i:i + 2]) for i in (0, 2, 4)]
    # Smaller than one paragraph: cuts fall after sentence ends.
    chunks = documents.chunk_document(doc, enc, chunk_tokens=per_paragraph - 1)
    for c in chunks:
        assert c.text.endswith(".") and c.text[0] == "p"


def test_long_word_is_split_and_ids_are_stable():
    doc = documents.Document(source="mem", text="short words then " + "x" * 50 + " end.")
    chunks = documents.chunk_document(doc, CharEncoder(), chunk_tokens=20)
    assert all(len(c.text) <= 20 for c in chunks)
    # Without overlap the chunks tile the text; only the over-long word is cut mid-word.
    assert "x" * 50 in "".join(c.text for c in chunks)
    assert sum(c.text.startswith("x") for c in chunks) >= 3
    again = documents.chunk_document(documents.Document(source="elsewhere", text=doc.text),
                                     CharEncoder(), chunk_tokens=20)
    assert [c.id for c in chunks] == [c.id for c in again]
    # Content ids: equal text <=> equal id (the two middle "x" chunks share one).
    assert len({c.id for c in chunks}) == len({c.text for c in chunks}) == 3


def test_context_budget_bounds_chunks_or_fails_clearly():
    doc = documents.load_document(EXAMPLE)
    enc = WordEncoder()
    chunks = documents.chunk_document(doc, enc, chunk_tokens=500, context_length=300,
                                      reserved_tokens=180)
    assert max(c.num_tokens for c in chunks) <= 120
    for c in chunks:
        assert c.num_tokens + 180 <= 300
    with pytest.raises(ValueError, match="no room for a chunk"):
        documents.chunk_document(doc, enc, chunk_tokens=500, context_length=100,
                                 reserved_tokens=100)
    with pytest.raises(ValueError, match="overlap"):
        documents.chunk_document(doc, enc, chunk_tokens=50, overlap=50)


def test_chunk_documents_drops_repeated_passages(tmp_path):
    a = documents.Document(source="a", text="Same paragraph here.\n\nOnly in a.")
    b = documents.Document(source="b", text="Same paragraph here.\n\nOnly in b.")
    chunks = documents.chunk_documents([a, b], WordEncoder(), chunk_tokens=4)
    assert [c.text for c in chunks] == ["Same paragraph here.", "Only in a.", "Only in b."]


def test_chunking_with_a_trained_bpe_tokenizer():
    """Byte-level BPE merges across piece boundaries; chunks must still fit when re-encoded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    doc = documents.load_document(EXAMPLE)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([doc.text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    class Encoder:
        def encode(self, text):
            return tok.encode(text).ids

    chunks = documents.chunk_document(doc, Encoder(), chunk_tokens=128, overlap=24,
                                      context_length=1024, reserved_tokens=900)
    assert len(chunks) > 5
    for c in chunks:
        assert len(tok.encode(c.text).ids) == c.num_tokens <= 124
    for a, b in zip(chunks, chunks[1:]):
        assert b.start > a.start and b.start <= a.end + 2  # overlapping or adjacent
