"""The bundled Wikipedia sample: find it, stream-parse the MediaWiki XML, and strip it to plain text.

gensim ships a 1.7 MB bz2 slice of an English Wikipedia dump (about a hundred articles) as test
data. We use it as calibration and evaluation text that works offline; gensim itself is never
imported (it is installed with --no-deps and would pull in scipy).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import mwparserfromhell
from mwparserfromhell.nodes import ExternalLink, Heading, Tag, Wikilink

from ..errors import SlimtuneError

_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_CHARS = 200  # below this an article is a stub or a list of links, not prose

# Tags whose contents are not running prose: references, tables, formulas, galleries.
_DROP_TAGS = {"ref", "references", "table", "math", "gallery", "imagemap", "timeline", "score"}
# References are removed with a regex before parsing: it is faster than walking the node tree,
# and it also catches <ref> inside markup the parser gives up on.
_REF = re.compile(r"<ref\b[^>]*/\s*>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
# Lines left over from markup the parser could not read (broken tables, half-closed file links).
_JUNK_LINE = re.compile(r"^(\{\||\|\}|\||!|\[\[|(Category|File|Image|thumb)[:|])", re.I)
_EMPTY_PARENS = re.compile(r" ?\(\s*[,;]?\s*\)")  # "Albedo () or ..." after a template is dropped
_SPACES = re.compile(r"[ \t\u00a0]{2,}")
# Links that are not part of the sentence they sit in: media, categories, interlanguage ("de:...").
_NON_PROSE_LINK = re.compile(r"^\s*(?:(?i:file|image|media|category)|[a-z]{2,3}(?:-[a-z]+)*|simple)\s*:")


def bundled_wiki_path() -> Path:
    """Path of gensim's Wikipedia sample, found via the import system without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / _SAMPLE
        if path.is_file():
            return path
    raise SlimtuneError("bundled Wikipedia sample not found: run `pip install --no-deps gensim`")


def wiki_articles(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(title, plain text) of every article in a MediaWiki XML dump (.xml or .xml.bz2).

    Only namespace-0 pages are kept; redirects and articles under MIN_CHARS characters after
    cleaning are skipped. Parsing takes a couple of seconds, so results are cached per path.
    """
    path = Path(path).expanduser() if path is not None else bundled_wiki_path()
    if not path.is_file():
        raise SlimtuneError(f"Wikipedia dump {path} does not exist; pass an existing .xml or .xml.bz2 file")
    return list(_parse_cached(str(path.resolve())))


@functools.lru_cache(maxsize=4)
def _parse_cached(path: str) -> tuple[tuple[str, str], ...]:
    articles = []
    for title, wikitext in _iter_pages(Path(path)):
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_CHARS:
            articles.append((title, text))
    return tuple(articles)


def _iter_pages(path: Path):
    """Yield (title, wikitext) of non-redirect namespace-0 pages, streaming so memory stays flat."""
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rb") as f:
            root = None
            for event, elem in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = elem
                if event != "end" or _local(elem.tag) != "page":
                    continue
                fields = {}
                for child in elem.iter():  # title, ns, redirect, and revision/text
                    fields.setdefault(_local(child.tag), child)
                title = _text(fields.get("title"))
                wikitext = _text(fields.get("text"))
                is_redirect = "redirect" in fields or wikitext.lstrip().upper().startswith("#REDIRECT")
                if _text(fields.get("ns")).strip() in ("", "0") and not is_redirect and title:
                    yield title, wikitext
                root.clear()  # drop finished pages; the dump can be far larger than memory
    except (OSError, EOFError, ET.ParseError) as exc:
        raise SlimtuneError(
            f"cannot parse Wikipedia dump {path} ({exc}); pass a MediaWiki XML export (.xml or .xml.bz2)"
        ) from exc


def _local(tag: str) -> str:
    """'{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page', whatever the export version."""
    return tag.rsplit("}", 1)[-1]


def _text(elem) -> str:
    return (elem.text or "") if elem is not None else ""


def clean_wikitext(wikitext: str) -> str:
    """Wikitext -> prose: paragraphs separated by one blank line, no markup, no captions."""
    code = mwparserfromhell.parse(_REF.sub("", wikitext))
    _drop_non_prose(code)
    text = _EMPTY_PARENS.sub("", code.strip_code())
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    lines = ["" if _JUNK_LINE.match(line) else line for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _drop_non_prose(code) -> None:
    """Remove file/category/interlanguage links and non-prose tags, at any depth.

    strip_code() would keep a file link's caption ("thumb|upright|Portrait of ...") and a
    category's name, so they go first. Filtering each node list is much faster than
    Wikicode.remove(), which searches the whole tree for every node.
    """
    code.nodes = [node for node in code.nodes if _is_prose(node)]
    for node in code.nodes:
        if isinstance(node, Tag):
            inner = node.contents
        elif isinstance(node, Wikilink):
            inner = node.text
        elif isinstance(node, (Heading, ExternalLink)):
            inner = node.title
        else:
            inner = None  # templates and comments: strip_code() drops them whole
        if inner is not None:
            _drop_non_prose(inner)


def _is_prose(node) -> bool:
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() not in _DROP_TAGS
    if isinstance(node, Wikilink):
        return not _NON_PROSE_LINK.match(str(node.title))  # "[[:Category:x]]" (leading colon) is prose
    return True
