"""Tests for slimtune.data: the Wikipedia sample, file and hub sources, packing and batches."""

from __future__ import annotations

import bz2
import json
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from slimtune.data import (
    SPLITS,
    batch_at,
    bundled_wiki_path,
    clean_wikitext,
    iterate_batches,
    load_texts,
    load_tokens,
    pack,
    split_of,
    wiki_articles,
)
from slimtune.errors import SlimtuneError

WORDS = "the cat sat on a mat dog ran far away".split()


def word_tokenizer(eos: bool = True, model_max_length: int = 4) -> PreTrainedTokenizerFast:
    """One token per known word; a tiny max length so any real text would trigger the length warning."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"eos_token": "<eos>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   model_max_length=model_max_length, **extra)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# --- the bundled Wikipedia sample -------------------------------------------------------------

def test_bundled_wiki_path_found_without_importing_gensim():
    assert bundled_wiki_path().is_file()
    assert "gensim" not in sys.modules


def test_bundled_wiki_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SlimtuneError, match="pip install --no-deps gensim"):
        bundled_wiki_path()


def test_wiki_splits_are_disjoint_deterministic_and_non_empty():
    articles = wiki_articles()
    titles = [title for title, _ in articles]
    assert len(titles) == len(set(titles)) > 50
    assert "AccessibleComputing" not in titles  # a redirect in the dump
    assert not any(":" in t and t.split(":")[0] in ("Wikipedia", "Talk", "Category") for t in titles)
    by_split = {s: {t for t in titles if split_of(t) == s} for s in SPLITS}
    assert all(by_split.values())
    assert set.union(*by_split.values()) == set(titles)
    for split in SPLITS:
        texts = load_texts("wiki", split)
        assert texts == load_texts("wiki", split)
        assert len(texts) == len(by_split[split])
        assert all(len(t) >= 200 and "[[" not in t and "\n\n\n" not in t for t in texts)
    assert wiki_articles() == articles


def test_split_rule_matches_docstring():
    import hashlib

    for title in ["Anarchism", "Albedo", "Ünïcode", "x" * 300]:
        bucket = int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10
        assert split_of(title) == {0: "test", 1: "validation"}.get(bucket, "train")


PROSE = "It has a long history of careful study. " * 8

DUMP = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Moved</title><ns>0</ns><id>1</id><redirect title="Article" />
    <revision><id>1</id><text>#REDIRECT [[Article]]</text></revision></page>
  <page><title>Old name</title><ns>0</ns><id>2</id>
    <revision><id>2</id><text>#redirect [[Article]] {PROSE}</text></revision></page>
  <page><title>Talk:Article</title><ns>1</ns><id>3</id>
    <revision><id>3</id><text>Talk page chatter. {PROSE}</text></revision></page>
  <page><title>Stub</title><ns>0</ns><id>4</id>
    <revision><id>4</id><text>'''Stub''' is short.</text></revision></page>
  <page><title>Article</title><ns>0</ns><id>5</id>
    <revision><id>5</id><text>{{{{Infobox thing|name=Article}}}}
'''Article''' is a [[Thing|thing]] from [[Star Wars: A New Hope]].&lt;ref&gt;Secret source&lt;/ref&gt;


[[File:Pic.jpg|thumb|upright|A caption]]
== History ==
{PROSE}
{{| class="wikitable"
| cell one || cell two
|}}
[[Category:Things]]
[[de:Artikel]]</text></revision></page>
</mediawiki>"""


def test_parser_keeps_only_articles_and_strips_markup(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(DUMP.encode()))
    articles = wiki_articles(path)
    assert [title for title, _ in articles] == ["Article"]
    text = articles[0][1]
    assert text.startswith("Article is a thing from Star Wars: A New Hope.\n\nHistory\nIt has")
    for junk in ("Secret source", "caption", "thumb", "Category", "Artikel", "cell", "Infobox", "{", "\n\n\n"):
        assert junk not in text
    # A dump path also works as a data source, split by title like the bundled sample.
    assert load_texts(str(path), split_of("Article")) == [text]


def test_clean_wikitext_keeps_link_text_and_paragraphs():
    assert clean_wikitext("A [[b|c]] d.\n  \n\n\n  E ''f''.  ") == "A c d.\n\nE f."


# --- local files ------------------------------------------------------------------------------

def _documents(n):
    return [f"Document {i} is about topic {i * 7 % 13}.\nIt has a second line." for i in range(n)]


def _check_hash_split(per_split, docs):
    assert all(per_split.values())
    assert sorted(sum(per_split.values(), [])) == sorted(docs)
    for split, texts in per_split.items():
        assert all(split_of(t[:200]) == split for t in texts)


def test_txt_source_splits_on_blank_lines(tmp_path):
    docs = _documents(40)
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(docs[:20]) + "\n \n\n" + "\n\n".join(docs[20:]) + "\n")
    _check_hash_split({s: load_texts(str(path), s) for s in SPLITS}, docs)


def test_jsonl_source_one_document_per_line(tmp_path):
    docs = _documents(40)
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    _check_hash_split({s: load_texts(str(path), s) for s in SPLITS}, docs)


def test_small_file_uses_same_text_for_every_split(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("one doc\n\ntwo doc\n\nthree doc")
    with pytest.warns(UserWarning, match="same text"):
        texts = {s: load_texts(str(path), s) for s in SPLITS}
    assert texts["train"] == texts["validation"] == texts["test"] == ["one doc", "two doc", "three doc"]


def test_records_sharing_their_opening_are_split_by_the_whole_text(tmp_path):
    """500 chat records that all open with one 298-character system prompt used to hash alike: no
    test or validation document, so the test split silently was the training text."""
    from slimtune.data import held_out

    prompt = "You are a helpful assistant. " * 10
    docs = [f"{prompt}User question {i}: what is {i} times {i + 7}?" for i in range(500)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    per_split = {s: load_texts(str(path), s) for s in SPLITS}
    assert all(per_split.values()) and sorted(sum(per_split.values(), [])) == sorted(docs)  # disjoint, all there
    assert all(split_of(t) == split for split, texts in per_split.items() for t in texts)
    assert held_out(str(path))


def test_too_few_documents_are_flagged_as_not_held_out(tmp_path):
    from slimtune.data import held_out

    path = tmp_path / "few.txt"
    path.write_text("\n\n".join(f"document number {i}" for i in range(4)))
    with pytest.warns(UserWarning, match="4 documents are too few to split.*not held out"):
        assert load_texts(str(path), "test") == load_texts(str(path), "train")
    assert not held_out(str(path))


def test_a_folder_of_text_files_reads_like_the_files_together(tmp_path):
    """A folder went through `datasets`, which made one row per line of a .txt (paragraphs split
    across train and test) and silently dropped the .txt files next to a .jsonl."""
    docs = _documents(40)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(d.replace(" ", "\n", 1) for d in docs[:20]))  # wrapped paragraphs
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[20:]))
    wrapped = [d.replace(" ", "\n", 1) for d in docs[:20]] + docs[20:]
    _check_hash_split({s: load_texts(str(folder), s) for s in SPLITS}, wrapped)
    (folder / "c.csv").write_text("id,text\n1,hello\n")
    with pytest.raises(SlimtuneError, match=r"mixes .txt/.jsonl files with others \(c.csv\)"):
        load_texts(str(folder), "train")


def test_compressed_files_are_read_and_csv_is_refused(tmp_path):
    import gzip

    docs = _documents(40)
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("\n\n".join(docs).encode()))
    (tmp_path / "c.jsonl.bz2").write_bytes(bz2.compress("\n".join(json.dumps({"text": d}) for d in docs).encode()))
    (tmp_path / "bom.jsonl").write_text("\ufeff" + "\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    for name in ("c.txt.gz", "c.jsonl.bz2", "bom.jsonl"):
        _check_hash_split({s: load_texts(str(tmp_path / name), s) for s in SPLITS}, docs)
    (tmp_path / "d.csv").write_text("id,text\n1,hello\n")
    with pytest.raises(SlimtuneError, match="is a CSV file, which would be read as raw text.*jsonl"):
        load_texts(str(tmp_path / "d.csv"), "train")


@pytest.mark.parametrize("content", ["", "  \n\n \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(SlimtuneError, match=r"notes\.txt is empty; pass a file with text"):
        load_texts(str(path), "train")


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(SlimtuneError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_texts(str(path), "train")
    path.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(SlimtuneError, match=r'bad\.jsonl line 3 has no string "text" field'):
        load_texts(str(path), "train")
    path.write_text('{"text": "fine"}\n{"text": null}\n')  # said "no string text field (fields: text)" before
    with pytest.raises(SlimtuneError, match=r'bad\.jsonl line 2 has a "text" field that is null, not a string'):
        load_texts(str(path), "train")


def test_missing_file_and_unknown_split(tmp_path, monkeypatch):
    with pytest.raises(SlimtuneError, match=r"data file .*nope\.txt does not exist"):
        load_texts(str(tmp_path / "nope.txt"), "train")
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)  # "data/nodir" under an existing local folder is a path, not a hub id to retry for 30 s
    with pytest.raises(SlimtuneError, match=r"data file data/nodir does not exist"):
        load_texts("data/nodir", "train")
    with pytest.raises(SlimtuneError, match="unknown split 'dev'"):
        load_texts("wiki", "dev")


# --- Hugging Face datasets (a fake module: no network, no slow import) -------------------------

def table(**columns):
    """A real `datasets.Dataset`, so the code is checked against the library's actual API."""
    return pytest.importorskip("datasets").Dataset.from_dict(columns)


def fake_datasets(monkeypatch, load_dataset):
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=record))
    return calls


def test_hub_failure_and_missing_package_are_user_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(SlimtuneError, match="could not load dataset 'wikitext2' .*use --data wiki"):
        load_texts("wikitext2", "test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SlimtuneError, match="`datasets` is not installed"):
        load_texts("someone/corpus", "train")


def test_hub_aliases_map_names_fields_and_splits(monkeypatch):
    rows = {s: table(text=[f" = {s} = \n", "", "line\n"]) for s in SPLITS}
    ptb = {s: table(sentence=["a b", "c d"]) for s in SPLITS}
    c4 = table(text=["doc one", " ", "doc two"])  # tables first: the fake module has no Dataset
    calls = fake_datasets(monkeypatch, lambda *a, **k: rows)
    assert load_texts("wikitext2", "validation") == ["\n\n".join([" = validation = \n", "", "line\n"])]
    assert calls[-1][0] == ("wikitext", "wikitext-2-raw-v1")

    calls = fake_datasets(monkeypatch, lambda *a, **k: ptb)
    assert load_texts("ptb", "test") == ["a b c d"]
    assert calls[-1][0] == ("ptb_text_only", "penn_treebank")

    fake_datasets(monkeypatch, lambda *a, **k: {"train": rows["train"], "test": rows["test"]})
    with pytest.raises(SlimtuneError, match="has no 'validation' split"):
        load_texts("someone/corpus", "validation")

    calls = fake_datasets(monkeypatch, lambda *a, **k: c4)
    assert load_texts("c4", "validation") == ["doc one", "doc two"]
    args, kwargs = calls[-1]
    assert args == ("allenai/c4",) and kwargs["split"] == "validation"
    assert kwargs["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_hub_dataset_with_only_train_is_hash_split(monkeypatch):
    docs = _documents(40)
    only_train = {"train": table(id=["x"] * 40, text=docs)}
    fake_datasets(monkeypatch, lambda *a, **k: only_train)
    _check_hash_split({s: load_texts("someone/corpus", s) for s in SPLITS}, docs)


def test_a_folder_without_text_field_is_refused_like_the_file(tmp_path, monkeypatch):
    """`--data DIR` (read by `datasets`) and `--data DIR/file.jsonl` treat a missing "text" alike:
    no training on a guessed column, one line naming the fields found and the fix."""
    docs = _documents(20)
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"title": f"t{i}", "body": d} for i, d in enumerate(docs)]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tables = {"train": table(title=[r["title"] for r in rows], body=docs)}  # before the fake module
    fake_datasets(monkeypatch, lambda *a, **k: tables)
    for source in (folder, folder / "data.jsonl"):
        with pytest.raises(SlimtuneError, match='no (string )?"text" (column|field).*title, body.*"text"') as err:
            load_texts(str(source), "train")
        assert "\n" not in str(err.value)


# --- packing ----------------------------------------------------------------------------------

def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pack_joins_documents_with_eos_and_drops_the_tail(tok, capfd):
    docs = ["the cat sat on a mat", "dog ran", "   ", "far away the"]
    rows = pack(docs, tok, seq_len=4)
    eos = tok.eos_token_id
    stream = ids(tok, docs[0]) + [eos] + ids(tok, docs[1]) + [eos] + ids(tok, docs[3])
    assert rows.dtype == torch.long and rows.shape == (len(stream) // 4, 4)
    assert rows.flatten().tolist() == stream[: rows.numel()]
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_pack_without_eos_concatenates(tok):
    plain = word_tokenizer(eos=False)
    rows = pack(["the cat", "sat on"], plain, seq_len=2)
    assert rows.tolist() == [ids(tok, "the cat"), ids(tok, "sat on")]


def test_pack_max_sequences_are_evenly_spaced(tok):
    text = " ".join(WORDS * 4)  # 40 tokens -> 10 windows of 4
    every = pack([text], tok, seq_len=4)
    assert every.shape == (10, 4)
    assert torch.equal(pack([text], tok, 4, max_sequences=4), every[[0, 3, 6, 9]])
    assert torch.equal(pack([text], tok, 4, max_sequences=1), every[[0]])
    assert torch.equal(pack([text], tok, 4, max_sequences=50), every)
    assert torch.equal(pack([text], tok, 4, max_sequences=4), pack([text], tok, 4, max_sequences=4))


def test_pack_errors(tok):
    with pytest.raises(SlimtuneError, match=r"only 5 tokens, fewer than --seq-len 8; use a smaller --seq-len"):
        pack(["the cat sat on a"], tok, seq_len=8)
    with pytest.raises(SlimtuneError, match="--seq-len must be at least 2"):
        pack(["the cat sat on a"], tok, seq_len=1)
    with pytest.raises(SlimtuneError, match="only 0 tokens"):
        pack([], tok, seq_len=2)


def test_load_tokens_from_file(tmp_path, tok):
    path = tmp_path / "words.txt"
    path.write_text("the cat sat\n\non a mat")
    with pytest.warns(UserWarning):
        rows = load_tokens(str(path), tok, "test", seq_len=3)
    assert rows.tolist() == [ids(tok, "the cat sat"), [tok.eos_token_id, *ids(tok, "on a")]]


# --- batches ----------------------------------------------------------------------------------

TOKENS = torch.arange(30).view(10, 3)  # 10 rows of seq_len 3; row i starts with 3 * i


def test_batch_at_resumes_exactly_like_an_uninterrupted_run():
    stream = iterate_batches(TOKENS, batch_size=4, seed=7)
    uninterrupted = [next(stream) for _ in range(12)]  # 48 rows: crosses four epoch boundaries
    for step, batch in enumerate(uninterrupted):
        assert batch.shape == (4, 3)
        assert torch.equal(batch, batch_at(TOKENS, 4, seed=7, step=step))
    resumed = iterate_batches(TOKENS, batch_size=4, seed=7, start_step=5)
    assert all(torch.equal(next(resumed), b) for b in uninterrupted[5:])


def test_each_epoch_is_a_permutation_and_seed_matters():
    epoch0 = torch.cat([batch_at(TOKENS, 5, seed=1, step=s) for s in (0, 1)])
    epoch1 = torch.cat([batch_at(TOKENS, 5, seed=1, step=s) for s in (2, 3)])
    assert sorted(epoch0[:, 0].tolist()) == sorted(epoch1[:, 0].tolist()) == list(range(0, 30, 3))
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(batch_at(TOKENS, 10, seed=1, step=0), batch_at(TOKENS, 10, seed=2, step=0))


def test_iterate_batches_with_epochs_drops_the_incomplete_batch():
    batches = list(iterate_batches(TOKENS, batch_size=4, seed=0, epochs=2))
    assert len(batches) == 5  # 20 rows // 4
    assert list(iterate_batches(TOKENS, batch_size=4, seed=0, epochs=2, start_step=5)) == []
    with pytest.raises(SlimtuneError, match="make no batch"):
        list(iterate_batches(TOKENS, batch_size=11, seed=0, epochs=1))
