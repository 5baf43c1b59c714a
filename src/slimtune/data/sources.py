"""Text sources: the bundled Wikipedia sample, local .txt/.jsonl files, and Hugging Face datasets.

Every source returns plain documents for one split. Sources without a split of their own (the
wiki sample, local files, single-split datasets) use `split_of`, so the same document always
lands in the same split.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlimtuneError
from .splits import SPLITS, check_split, split_of
from .wiki import wiki_articles

MIN_DOCUMENTS = 10  # below this a hashed split would leave some split empty or nearly so
_FILE_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".ndjson", ".json", ".xml", ".bz2", ".csv", ".gz"}
_FIX = "use --data wiki or a local .txt/.jsonl file"


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
        return _load_file(path, split)
    if source not in _ALIASES and not path.is_dir() and _looks_like_file(source):
        raise SlimtuneError(f"data file {source} does not exist; check the path, or {_FIX}")
    return _load_hub(source, split)


def _looks_like_file(source: str) -> bool:
    # "allenai/c4" contains a slash too, so a slash alone does not make a path.
    return Path(source).suffix.lower() in _FILE_SUFFIXES or source.startswith((".", "/", "~"))


def _load_file(path: Path, split: str) -> list[str]:
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".xml", ".xml.bz2")):
        return [text for title, text in wiki_articles(path) if split_of(title) == split]
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SlimtuneError(f"text file {path} is not UTF-8 ({exc.reason}); re-save it as UTF-8") from exc
    if not raw.strip():
        raise SlimtuneError(f"text file {path} is empty; pass a file with text or {_FIX}")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        docs = _jsonl_documents(path, raw)
    elif path.suffix.lower() == ".json":
        raise SlimtuneError(f"{path} is a .json file; write one {{\"text\": ...}} object per line to a .jsonl file")
    else:
        docs = [doc.strip() for doc in re.split(r"\n[ \t\r]*\n", raw) if doc.strip()]
    return _hash_split(docs, split, str(path))


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
            found = f"fields: {', '.join(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise SlimtuneError(f'{path} line {number} has no string "text" field ({found}); '
                                'write one {"text": ...} object per line, renaming your text field to "text"')
        if record["text"].strip():
            docs.append(record["text"])
    if not docs:
        raise SlimtuneError(f"text file {path} has no non-empty \"text\" values; pass a file with text or {_FIX}")
    return docs


def _hash_split(docs: list[str], split: str, origin: str) -> list[str]:
    """Split documents by `split_of(document[:200])`; too few documents -> same text for all splits."""
    by_split = {name: [] for name in SPLITS}
    for doc in docs:
        by_split[split_of(doc[:200])].append(doc)
    if len(docs) < MIN_DOCUMENTS or not all(by_split.values()):
        # Python's default filter shows this once per source, not once per split.
        warnings.warn(
            f"{origin}: {len(docs)} documents are too few for a train/validation/test split; the same "
            "text is used for every split, so evaluation numbers are not held-out",
            stacklevel=4,  # point at the caller of load_texts
        )
        return list(docs)
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
