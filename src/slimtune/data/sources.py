"""Text sources: the bundled Wikipedia sample, local .txt/.jsonl files, and Hugging Face datasets.

Every source returns plain documents for one split. Sources without a split of their own (the
wiki sample, local files, single-split datasets) use `split_of`, so the same document always
lands in the same split.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimtuneError
from ..io import visible_files
from .splits import SPLITS, check_split, split_of
from .wiki import wiki_articles

MIN_DOCUMENTS = 10  # below this a hashed split would leave some split empty or nearly so
_FILE_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".ndjson", ".json", ".xml", ".bz2", ".csv", ".gz", ".xz"}
_TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".ndjson"}  # what a file or a folder of files may hold
_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # compressed text: name.txt.gz, name.jsonl.bz2 ...
_FIX = "use --data wiki or a local .txt/.jsonl file"
# sources whose documents were too few to split: every split is the same text (see held_out)
_NOT_HELD_OUT: set[str] = set()


def held_out(source: str) -> bool:
    """False when `source`, as loaded so far, had to use the same text for every split, so that
    its test perplexity is not measured on held-out text (reports say so)."""
    return source not in _NOT_HELD_OUT


@dataclass(frozen=True)
class _HubDataset:
    path: str
    config: str | None = None
    field: str = "text"
    # How rows become documents: None keeps one row per document; a string joins all rows into
    # one document (wikitext and PTB rows are lines, and papers join them this way, so our
    # perplexities stay comparable with SparseGPT/Wanda-style evaluation).
    join: str | None = None
    data_files: tuple[tuple[str, str], ...] = ()  # (split, file): only the shard that is needed


_ALIASES = {
    "wikitext2": _HubDataset("wikitext", "wikitext-2-raw-v1", join="\n\n"),
    "ptb": _HubDataset("ptb_text_only", "penn_treebank", field="sentence", join=" "),
    # C4 has no test split: its second validation shard serves as one, disjoint from the first.
    "c4": _HubDataset("allenai/c4", data_files=(
        ("train", "en/c4-train.00000-of-01024.json.gz"),
        ("validation", "en/c4-validation.00000-of-00008.json.gz"),
        ("test", "en/c4-validation.00001-of-00008.json.gz"),
    )),
}


def load_texts(source: str, split: str) -> list[str]:
    """Documents of `split` ("train", "validation" or "test") from `source`.

    `source` is "wiki" (the bundled Wikipedia sample), a path to a .txt file (documents separated
    by blank lines), a .jsonl file (one {"text": ...} per line) or a MediaWiki .xml/.xml.bz2
    dump, an alias ("wikitext2", "ptb", "c4"), or any `datasets.load_dataset` name.
    """
    check_split(split)
    if source == "wiki":
        return [text for title, text in wiki_articles() if split_of(title) == split]
    path = Path(source).expanduser()
    if path.is_file():
        docs = _load_file(path, split)
    elif path.is_dir() and (files := _text_files(path)):
        docs = _hash_split([doc for f in files for doc in _file_documents(f)], split, f"folder {path}")
    elif source not in _ALIASES and not path.is_dir() and _looks_like_file(source):
        raise SlimtuneError(f"data file {source} does not exist; check the path, or {_FIX}")
    else:
        docs = _load_hub(source, split)
    if isinstance(docs, _SameForAll):
        _NOT_HELD_OUT.add(source)
    return list(docs)


class _SameForAll(list):
    """Documents that could not be split: the same list for every split."""


def _text_files(folder: Path) -> list[Path]:
    """The .txt/.jsonl files of a folder (sorted, hidden entries skipped), read like single files.
    A folder that also holds other files is refused rather than read in part."""
    files = visible_files(folder)
    text = [p for p in files if _inner_suffix(p) in _TEXT_SUFFIXES]
    other = [p for p in files if p not in text]
    if text and other:
        names = ", ".join(str(p.relative_to(folder)) for p in other[:3]) + (" ..." if len(other) > 3 else "")
        raise SlimtuneError(f"folder {folder} mixes .txt/.jsonl files with others ({names}) that would not be read; "
                            "move them out, or convert them to .txt/.jsonl")
    return text


def _inner_suffix(path: Path) -> str:
    """The format suffix under a compression suffix: corpus.jsonl.gz -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _looks_like_file(source: str) -> bool:
    # "allenai/c4" contains a slash too, so a slash alone does not make a path; "data/nodir" where a
    # local folder "data" exists does (a hub lookup would only retry for half a minute, then fail)
    parts = Path(source).parts
    local_parent = len(parts) > 1 and Path(parts[0]).expanduser().is_dir()
    return Path(source).suffix.lower() in _FILE_SUFFIXES or source.startswith((".", "/", "~")) or local_parent


def _load_file(path: Path, split: str) -> list[str]:
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".xml", ".xml.bz2")):
        return [text for title, text in wiki_articles(path) if split_of(title) == split]
    return _hash_split(_file_documents(path), split, str(path))


def _file_documents(path: Path) -> list[str]:
    """The documents of one .txt (separated by blank lines) or .jsonl file, compressed or not."""
    inner = _inner_suffix(path)
    if inner == ".json":
        raise SlimtuneError(f"{path} is a .json file; write one {{\"text\": ...}} object per line to a .jsonl file")
    if inner in (".csv", ".tsv", ".parquet"):
        raise SlimtuneError(f"{path} is a {inner[1:].upper()} file, which would be read as raw text (header, ids and quotes included); "
                            "write its text column to a .jsonl file, one {\"text\": ...} per line")
    opener = _OPENERS.get(path.suffix.lower())
    try:
        if opener:
            import importlib

            with importlib.import_module(opener).open(path, "rt", encoding="utf-8") as f:
                raw = f.read()
        else:
            raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SlimtuneError(f"text file {path} is not UTF-8 ({exc.reason}); re-save it as UTF-8") from exc
    except (OSError, EOFError) as exc:  # a truncated or mislabelled archive
        raise SlimtuneError(f"could not decompress {path} ({exc}); check the file, or pass it uncompressed") from exc
    raw = raw.removeprefix("\ufeff")  # a byte-order mark is encoding, not text
    if not raw.strip():
        raise SlimtuneError(f"text file {path} is empty; pass a file with text or {_FIX}")
    if inner in (".jsonl", ".ndjson"):
        return _jsonl_documents(path, raw)
    return [doc.strip() for doc in re.split(r"\n[ \t\r]*\n", raw) if doc.strip()]


def _jsonl_documents(path: Path, raw: str) -> list[str]:
    docs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlimtuneError(f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            if isinstance(record, dict) and "text" in record:  # present, but null or not a string
                raise SlimtuneError(f'{path} line {number} has a "text" field that is {json.dumps(record["text"])[:40]}, not a string; '
                                    'give every record its text as a string, or drop that line')
            found = f"fields: {', '.join(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise SlimtuneError(f'{path} line {number} has no string "text" field ({found}); '
                                'write one {"text": ...} object per line, renaming your text field to "text"')
        if record["text"].strip():
            docs.append(record["text"])
    if not docs:
        raise SlimtuneError(f"text file {path} has no non-empty \"text\" values; pass a file with text or {_FIX}")
    return docs


def _hash_split(docs: list[str], split: str, origin: str) -> list[str]:
    """Split documents by `split_of` of their first 200 characters, or of the whole document where
    several share those (records that open with the same system prompt, say). Too few documents, or
    a split left empty: the same text for all splits, with a warning, and `held_out` says so."""
    prefixes = Counter(doc[:200] for doc in docs)
    by_split = {name: [] for name in SPLITS}
    for doc in docs:
        by_split[split_of(doc[:200] if prefixes[doc[:200]] == 1 else doc)].append(doc)
    empty = [name for name, part in by_split.items() if not part]
    if len(docs) < MIN_DOCUMENTS or empty:
        why = (f"{len(docs)} documents are too few to split" if len(docs) < MIN_DOCUMENTS
               else f"no document of {len(docs)} fell into the {' or '.join(empty)} split")
        # Python's default filter shows this once per source, not once per split.
        warnings.warn(f"{origin}: {why}; the same text is used for every split, so evaluation numbers are not held out "
                      "(reports say so); give more documents (blank lines separate them in a .txt file)", stacklevel=4)
        return _SameForAll(docs)
    return by_split[split]


def _load_hub(name: str, split: str) -> list[str]:
    spec = _ALIASES.get(name, _HubDataset(name))
    try:
        import datasets
    except ImportError as exc:
        raise SlimtuneError(f"could not load dataset {name!r}: `datasets` is not installed; "
                            f"pip install datasets, or {_FIX}") from exc
    files = dict(spec.data_files)
    try:
        if files:  # download only the shard this split needs
            tables = {split: datasets.load_dataset(spec.path, data_files={split: files[split]}, split=split)}
        else:
            tables = datasets.load_dataset(spec.path, spec.config)
    except Exception as exc:  # offline, not cached, no such dataset: the user's fix is the same
        raise SlimtuneError(f"could not load dataset {name!r} (no cached copy and the hub is unreachable, "
                            f"or no such dataset; {type(exc).__name__}): {_FIX}") from exc
    if len(tables) == 1 and not files:  # e.g. a user's dataset with only "train": split it like a file
        (table,) = tables.values()
        return _hash_split(_documents(table, spec, name), split, f"dataset {name!r}")
    for candidate in (split, *(("valid", "dev", "val") if split == "validation" else ())):
        if candidate in tables:
            return _documents(tables[candidate], spec, name)
    raise SlimtuneError(f"dataset {name!r} has no {split!r} split (it has: {', '.join(tables)}); "
                        f"choose a dataset with that split or {_FIX}")


def _documents(table, spec: _HubDataset, name: str) -> list[str]:
    """Rows of the text column `spec.field` ("text" except for the aliases) as documents.

    No guessing: the column used is the one named, for a dataset, a folder (`--data DIR`, read by
    `datasets`) and a .jsonl file alike, so every source trains on the same field.
    """
    columns = list(table.column_names)
    if spec.field not in columns:
        raise SlimtuneError(f'dataset {name!r} has no "{spec.field}" column (columns: {", ".join(columns)}); '
                            f'rename the text column to "{spec.field}", or {_FIX}')
    rows = [row or "" for row in table[spec.field]]
    if spec.join is not None:
        return [spec.join.join(rows)]
    return [row for row in rows if row.strip()]
