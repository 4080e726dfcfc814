"""Documents: read every supported file under ``paths.documents`` into normalized sections.

Document formats (under ``paths.documents``; ids are the relative path without extension unless
a JSON document carries an ``id``):

- ``.md``: ``# Title`` line, then ``## Heading`` sections (``##``-``######``).
- ``.txt``: first non-blank line is the title, then ``== Heading ==`` sections.
- ``.json``: ``{"id", "title", "sections": [{"heading", "text"}]}`` (or ``"text"`` for one section).
- ``.jsonl``: one such object per line.
- ``.html``/``.htm``: ``<title>`` (else the first ``<h1>``) is the title, ``<h1>``-``<h6>`` open
  sections, block elements end paragraphs; boilerplate is dropped (:func:`_read_html`).
- ``.pdf`` (``pip install 'sphana[pdf]'``): text per page; sections from the outline, else
  heading-like lines, else ``ingest.pdf_pages_per_section`` pages (:func:`_read_pdf`).

Text before the first heading becomes a section with an empty heading. Character offsets of
chunks (and of gold annotations) index the *normalized* section text. Text formats must be UTF-8
(HTML may declare another encoding); binary or undecodable files are errors that name the file and
the byte. Files of other types are listed in the report, never read.

:func:`iter_documents` yields one document at a time (``ingest`` streams).
"""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphana.config import IngestConfig, OnError
from sphana.errors import InputError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TXT_HEADING = re.compile(r"^==+\s*(.*?)\s*==+\s*$")
# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket) before whitespace
# and an upper-case letter, digit or opening quote/bracket, or at a paragraph break.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])|\n\n+")


@dataclass
class Section:
    heading: str
    text: str


@dataclass
class Document:
    id: str
    title: str
    sections: list[Section]
    source: str  # file path, relative to the documents root
    line: int | None = None  # line in a .jsonl file


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode-normalize and tidy whitespace, keeping paragraph breaks.

    Lines inside a paragraph are joined with a space; paragraphs are separated by one blank line.
    """
    text = unicodedata.normalize(form, text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_SPACES.sub(" ", line).strip() for line in block.split("\n")]
        paragraph = " ".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (no surrounding whitespace)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.start() + len(m.group(0).rstrip()) if m.group(0).strip() else m.start()
        if end > start:
            spans.append((start, end))
        start = m.end()
    if start < len(text.rstrip()):
        spans.append((start, len(text.rstrip())))
    return spans


# --- decoding ----------------------------------------------------------------------------------

_FOREIGN_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_TO_UTF8 = "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > NEW)"


def decode_text(
    path: Path, data: bytes, line: int | None = None, offset: int = 0, encoding: str = "utf-8"
) -> str:
    """``data`` (the bytes of a text document, or of one line at byte ``offset`` of it) as text.

    Raises:
        InputError: for binary data (a NUL byte), UTF-16/32 text or bytes that are not valid
            ``encoding``, naming the file, the line and the byte offset in the file.
    """
    if offset == 0:
        for bom, name in _FOREIGN_BOMS:
            if data.startswith(bom):
                raise InputError(path, f"{name} text (byte-order mark at byte 0); {_TO_UTF8}", line)
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputError(
            path,
            f"binary data (NUL byte at byte {offset + nul}): not a text document; "
            "remove it or give it an extension ingest does not read",
            line,
        )
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        name = "UTF-8" if encoding == "utf-8" else f"{encoding} text as its <meta charset> says"
        raise InputError(
            path, f"not {name} ({e.reason} at byte {offset + e.start}); {_TO_UTF8}", line
        ) from None
    return text[1:] if offset == 0 and text.startswith("\ufeff") else text  # a UTF-8 BOM


# --- readers -----------------------------------------------------------------------------------


def _split_sections(lines: list[str], heading_re: re.Pattern[str]) -> list[Section]:
    sections = [Section("", "")]
    bodies: list[list[str]] = [[]]
    for line in lines:
        m = heading_re.match(line)
        if m:
            sections.append(Section(m.group(m.lastindex or 1), ""))
            bodies.append([])
        else:
            bodies[-1].append(line)
    for section, body in zip(sections, bodies, strict=True):
        section.text = "\n".join(body)
    return sections


def _title_line(lines: list[str], path: Path) -> int:
    title_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if title_at is None:
        raise InputError(path, "empty document")
    return title_at


def _unique_headings(sections: list[Section]) -> list[Section]:
    """Drop empty sections and number repeated headings ("Examples (2)"): formats written by
    other tools (HTML, PDF) repeat headings, and gold annotations name sections by heading."""
    kept = [s for s in sections if s.text.strip()]
    seen: Counter[str] = Counter()
    for s in kept:
        seen[s.heading] += 1
        if seen[s.heading] > 1:
            s.heading = f"{s.heading} ({seen[s.heading]})".strip()
    return kept


def _read_markdown(path: Path, rel: str, cfg: IngestConfig) -> Iterator[Document]:
    lines = decode_text(path, path.read_bytes()).splitlines()
    at = _title_line(lines, path)
    m = _MD_HEADING.match(lines[at])
    if not m or len(m.group(1)) != 1:
        raise InputError(path, "a Markdown document must start with a '# Title' line", at + 1)
    yield Document(rel, m.group(2), _split_sections(lines[at + 1 :], _MD_HEADING), str(path))


def _read_text(path: Path, rel: str, cfg: IngestConfig) -> Iterator[Document]:
    lines = decode_text(path, path.read_bytes()).splitlines()
    at = _title_line(lines, path)
    if _TXT_HEADING.match(lines[at]):
        raise InputError(path, "the first line of a .txt document must be its title", at + 1)
    yield Document(rel, lines[at], _split_sections(lines[at + 1 :], _TXT_HEADING), str(path))


def _from_json_object(obj: Any, path: Path, default_id: str, line: int | None) -> Document:
    if not isinstance(obj, dict):
        raise InputError(path, "expected a JSON object with 'title' and 'sections'", line)
    title = obj.get("title")
    if not isinstance(title, str) or not title.strip():
        raise InputError(path, "missing or empty string field 'title'", line)
    if "sections" in obj:
        if not isinstance(obj["sections"], list):
            raise InputError(path, "'sections' must be a list of {heading, text}", line)
        sections = []
        for i, section in enumerate(obj["sections"]):
            if not isinstance(section, dict) or not isinstance(section.get("text"), str):
                raise InputError(path, f"sections[{i}] needs a string field 'text'", line)
            if not isinstance(section.get("heading", ""), str):
                raise InputError(path, f"sections[{i}].heading must be a string", line)
            sections.append(Section(section.get("heading", ""), section["text"]))
    elif isinstance(obj.get("text"), str):
        sections = [Section("", obj["text"])]
    else:
        raise InputError(path, "needs 'sections' (list of {heading, text}) or 'text'", line)
    doc_id = obj.get("id", default_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise InputError(path, "'id' must be a non-empty string", line)
    return Document(doc_id, title, sections, str(path), line)


def _read_json(path: Path, rel: str, cfg: IngestConfig) -> Iterator[Document]:
    try:
        obj = json.loads(decode_text(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON ({e.msg})", e.lineno) from None
    yield _from_json_object(obj, path, rel, None)


def _read_jsonl(path: Path, rel: str, cfg: IngestConfig) -> Iterator[Document | InputError]:
    """Documents, one line at a time, and the errors of single lines, so that ``skip`` skips
    only those lines."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            at, offset = offset, offset + len(raw)
            try:
                line = decode_text(path, raw, lineno, at)
                if not line.strip():
                    continue
                yield _from_json_object(json.loads(line), path, f"{rel}:{lineno}", lineno)
            except json.JSONDecodeError as e:
                yield InputError(path, f"invalid JSON ({e.msg} at column {e.colno})", lineno)
            except InputError as e:
                yield e


# HTML: what is not content. <header>/<footer> are page banners only outside <article>, <aside>,
# <main>, <nav> and <section> (as in the ARIA mapping of HTML): an article's own header keeps its
# headings.
_HTML_DROP = frozenset(
    """script style noscript template nav aside form iframe object embed svg canvas button select
    input textarea dialog head""".split()  # noqa: SIM905 - a tag list reads better as text
)
_HTML_BANNERS = frozenset({"header", "footer"})
_HTML_LANDMARK_PARENTS = ["article", "aside", "main", "nav", "section"]
_HTML_DROP_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search"})
_HTML_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_HTML_BLOCKS = frozenset(
    """address article blockquote body caption dd details div dl dt fieldset figcaption figure
    footer header hr li main ol p pre section summary table tbody tfoot thead tr ul""".split()  # noqa: SIM905
)
_HTML_CELLS = frozenset({"td", "th"})
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.I)
_WHITESPACE = re.compile(r"\s+")


def _html_text(data: bytes, path: Path) -> str:
    """UTF-8, unless a ``<meta charset>`` in the first 1024 bytes declares another encoding."""
    m = _META_CHARSET.search(data[:1024])
    encoding = "utf-8"
    if m:
        declared = m.group(1).decode("ascii")
        try:
            encoding = codecs.lookup(declared).name
        except LookupError:
            raise InputError(
                path, f"unknown encoding {declared!r} in <meta charset>; {_TO_UTF8}"
            ) from None
        if encoding.startswith("utf-16"):  # as browsers do: a UTF-16 file has no ASCII <meta>
            encoding = "utf-8"
    return decode_text(path, data, encoding=encoding)


def _is_boilerplate(tag: Any) -> bool:
    name = tag.name
    attrs = tag.attrs or {}
    if name in _HTML_DROP or "hidden" in attrs or attrs.get("role") in _HTML_DROP_ROLES:
        return True
    if str(attrs.get("aria-hidden", "")).lower() == "true":
        return True
    if _HTML_HIDDEN_STYLE.search(str(attrs.get("style", ""))):
        return True
    return name in _HTML_BANNERS and tag.find_parent(_HTML_LANDMARK_PARENTS) is None


def _read_html(path: Path, rel: str, cfg: IngestConfig) -> Iterator[Document]:
    """Title from ``<title>`` (else the first ``<h1>``); ``h1``-``h6`` open sections; block
    elements end paragraphs; boilerplate (navigation, banners, scripts, forms, hidden elements)
    is dropped. Only ``<main>`` is read when the page has one."""
    from bs4 import BeautifulSoup, NavigableString
    from bs4.element import CData

    # html.parser (the standard library's) rather than lxml: pure Python, and the same tree on
    # every machine, so chunks do not depend on which optional parser happens to be installed
    soup = BeautifulSoup(_html_text(path.read_bytes(), path), "html.parser")
    title_tag = next((t for t in soup.find_all("title") if t.find_parent("svg") is None), None)
    title = _WHITESPACE.sub(" ", title_tag.get_text()).strip() if title_tag else ""
    for tag in [t for t in soup.find_all(True) if _is_boilerplate(t)]:
        if not tag.decomposed:  # inside an element already dropped
            tag.decompose()
    root = soup.find("main") or soup.find(attrs={"role": "main"}) or soup.body or soup
    first_h1 = root.find("h1")
    if not title and first_h1 is not None:
        title = _WHITESPACE.sub(" ", first_h1.get_text()).strip()
    if not title:
        raise InputError(path, "an HTML document needs a <title> or an <h1> (its title)")

    sections = [Section("", "")]
    paragraphs: list[str] = []
    parts: list[str] = []  # text of the paragraph (or heading) being read
    heading: Any = None  # the heading element being read

    def end_paragraph() -> None:
        text = _WHITESPACE.sub(" ", "".join(parts)).strip()
        parts.clear()
        if text:
            paragraphs.append(text)

    def end_section() -> None:
        end_paragraph()
        sections[-1].text = "\n\n".join(paragraphs)
        paragraphs.clear()

    stack: list[tuple[Any, bool]] = [(root, False)]  # (node, closing): no recursion limit
    while stack:
        node, closing = stack.pop()
        if isinstance(node, NavigableString):
            if type(node) in (NavigableString, CData):  # not comments, doctypes, ...
                parts.append(str(node))
            continue
        name = node.name
        if closing:
            if node is heading:
                text = _WHITESPACE.sub(" ", "".join(parts)).strip()
                parts.clear()
                heading = None
                # the <h1> that gives (or repeats) the title opens no section
                if text and not (name == "h1" and text == title):
                    end_section()
                    sections.append(Section(text, ""))
            elif name in _HTML_CELLS:
                parts.append(" ")
            elif name in _HTML_BLOCKS and heading is None:
                end_paragraph()
            continue
        if name == "br":
            parts.append(" ")
            continue
        if name in _HTML_HEADINGS and heading is None:
            end_paragraph()
            heading = node
        elif name in _HTML_BLOCKS and heading is None:
            end_paragraph()
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(node.contents))
    end_section()
    yield Document(rel, title, _unique_headings(sections), str(path))


# PDF: a heading-like line (when the PDF has no outline) is numbered ("2.1 Methods",
# "Chapter 3 ...") or in capitals, short, and does not end a clause.
_PDF_NUMBERED = re.compile(
    r"^(?:(?i:chapter|section|part|appendix)\s+[0-9A-Z]+|\d+(?:\.\d+)*)[.:)]?\s+[A-Z]"
)
_PDF_NUMBERING = re.compile(r"^\s*(?:(?:chapter|section|part|appendix)\s+)?\d+(?:\.\d+)*[.:)]?\s+")
_PDF_PAGE_NUMBER = re.compile(r"^(?:page\s+)?\d+(?:\s*(?:/|of)\s*\d+)?$", re.I)
_NOT_A_KEY = re.compile(r"[\W_]+")
_SENTENCE_ENDS = ".!?:\"')\u201d"


def _pdf_heading_line(line: str, previous: str | None) -> bool:
    """Whether ``line`` looks like a heading, ``previous`` being the line before it (None at the
    start): a heading follows the end of a sentence or another heading."""
    if not line or len(line) > 80 or len(line.split()) > 10 or line[-1] in ",;-":
        return False
    if previous and previous[-1] not in _SENTENCE_ENDS and not _pdf_heading_line(previous, None):
        return False
    if _PDF_NUMBERED.match(line):
        return True
    letters = [c for c in line if c.isalpha()]
    return len(letters) >= 4 and line[0].isalpha() and line.isupper() and line[-1] not in ".!?"


def _heading_key(text: str) -> str:
    return _NOT_A_KEY.sub("", _PDF_NUMBERING.sub("", text).lower())


def _running_key(line: str) -> str:
    return re.sub(r"\d+", "#", line)


def _pdf_page_lines(pages: list[str]) -> tuple[list[list[str]], set[tuple[int, int]]]:
    """Lines of each page, running heads/feet and page numbers dropped, with an empty line after
    each line that ends a paragraph (a short line that ends a sentence: plain text extraction
    keeps no vertical gaps) and around heading-like lines; and where those are (page, line)."""
    lines = [
        [
            line
            for line in (x.strip() for x in page.splitlines())
            if not _PDF_PAGE_NUMBER.match(line)
        ]
        for page in pages
    ]
    edges: Counter[str] = Counter()  # pages whose first or last line it is, numbers as "#"
    for page in lines:
        text = [line for line in page if line]
        if text:
            edges.update({_running_key(text[0]), _running_key(text[-1])})
    # a running head or foot: with a page number, on 2 pages; else on 3 (or all of 2 pages)
    running = {
        key
        for key, n in edges.items()
        if n >= (2 if key.startswith("#") or key.endswith("#") else max(2, min(3, len(lines))))
    }
    result: list[list[str]] = []
    headings: set[tuple[int, int]] = set()
    previous = None  # the last line with text, across pages
    for page in lines:
        at = [i for i, line in enumerate(page) if line]
        edge = {i for i in at[:1] + at[-1:] if _running_key(page[i]) in running}
        kept = [line for i, line in enumerate(page) if line and i not in edge]
        full = sorted(len(line) for line in kept)
        width = full[int(len(full) * 0.8)] if full else 0  # a typical full line
        out: list[str] = []
        for line in kept:
            if _pdf_heading_line(line, previous):
                headings.add((len(result), len(out) + 1))
                out += ["", line, ""]
            else:
                out.append(line)
                if len(line) < 0.8 * width and line[-1] in _SENTENCE_ENDS:
                    out.append("")
            previous = line
        result.append(out)
    return result, headings


def _pdf_outline(reader: Any) -> list[tuple[str, int]]:
    """``(title, page index)`` of every outline (bookmark) item, all levels, by page."""
    items: list[tuple[str, int]] = []
    stack = [iter(reader.outline)]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
        elif isinstance(node, list):
            stack.append(iter(node))
        else:
            page = reader.get_destination_page_number(node)
            title = _WHITESPACE.sub(" ", str(node.title or "")).strip()
            if page is not None and page >= 0 and title:
                items.append((title, page))
    return sorted(items, key=lambda item: item[1])  # stable: outline order within a page


def _pdf_sections(
    pages: list[list[str]],
    headings: set[tuple[int, int]],
    outline: list[tuple[str, int]],
    pages_per_section: int,
) -> list[Section]:
    flat = [(p, line) for p, page in enumerate(pages) for line in page]
    positions = [(p, i) for p, page in enumerate(pages) for i in range(len(page))]
    page_start = {}
    for i, (p, _) in enumerate(flat):
        page_start.setdefault(p, i)
    cuts: list[tuple[int, str, bool]] = []  # (line index, heading, the line is the heading)
    if outline:
        cursor = 0
        for title, page in outline:
            at = max(cursor, page_start.get(page, len(flat)))
            key = _heading_key(title)
            found = next(
                (
                    i
                    for i in range(at, len(flat))
                    if flat[i][0] == page and key and _heading_key(flat[i][1]) == key
                ),
                None,
            )
            cuts.append((at if found is None else found, title, found is not None))
            cursor = at if found is None else found + 1
    else:
        cuts = [(i, line, True) for i, (_, line) in enumerate(flat) if positions[i] in headings]
    if not cuts:  # fixed groups of pages
        for first in range(0, len(pages), pages_per_section):
            last = min(first + pages_per_section, len(pages))
            name = f"Pages {first + 1}-{last}" if last > first + 1 else f"Page {first + 1}"
            cuts.append((page_start.get(first, len(flat)), name, False))
    starts = [(0, "", False), *cuts]
    sections = []
    for k, (start, heading, on_line) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(flat)
        body = [line for _, line in flat[start + int(on_line) : end]]
        sections.append(Section(heading, "\n".join(body)))
    return _unique_headings(sections)


def _read_pdf(path: Path, rel: str, cfg: IngestConfig) -> Iterator[Document]:
    """Text per page (pypdf); sections from the outline (bookmarks), else heading-like lines,
    else ``ingest.pdf_pages_per_section`` pages each; title from the metadata, else the first
    line."""
    try:
        import pypdf
    except ImportError:
        raise InputError(
            path,
            "reading .pdf documents needs pypdf: pip install 'sphana[pdf]' (or pip install "
            "pypdf), or leave .pdf out of ingest.extensions",
        ) from None
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise InputError(path, "encrypted PDF (needs a password): decrypt it first")
        texts = [page.extract_text() or "" for page in reader.pages]
        outline = _pdf_outline(reader)
        meta = reader.metadata
        title = _WHITESPACE.sub(" ", str(meta.title or "")).strip() if meta else ""
    except InputError:
        raise
    except Exception as e:  # pypdf raises many types on damaged files: name the file, no traceback
        raise InputError(
            path, f"unreadable PDF ({type(e).__name__}: {str(e)[:200]}); is it a PDF?"
        ) from None
    if not any(text.strip() for text in texts):
        raise InputError(path, "the PDF has no text layer (a scanned document? run OCR first)")
    if not title:  # the first line is the title, as in a .txt document (even a running head's)
        p = next(p for p, text in enumerate(texts) if text.strip())
        lines = texts[p].strip().splitlines()
        title, texts[p] = lines[0].strip(), "\n".join(lines[1:])
    pages, headings = _pdf_page_lines(texts)
    sections = _pdf_sections(pages, headings, outline, cfg.pdf_pages_per_section)
    yield Document(rel, title, sections, str(path))


_READERS = {
    ".md": _read_markdown,
    ".txt": _read_text,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".html": _read_html,
    ".htm": _read_html,
    ".pdf": _read_pdf,
}


def _normalized(doc: Document, form: str, seen: dict[str, str]) -> Document:
    """Normalize a document's text and check it; raises InputError for an unusable one."""
    doc.title = normalize(doc.title, form)
    sections = [Section(normalize(s.heading, form), normalize(s.text, form)) for s in doc.sections]
    doc.sections = [s for s in sections if s.text]
    if not doc.sections:
        raise InputError(doc.source, f"document {doc.id!r} has no text", doc.line)
    headings = [s.heading for s in doc.sections]
    dup = next((h for h in headings if headings.count(h) > 1), None)
    if dup is not None:
        raise InputError(
            doc.source, f"document {doc.id!r} repeats section heading {dup!r}", doc.line
        )
    if doc.id in seen:
        raise InputError(
            doc.source, f"duplicate document id {doc.id!r} (first in {seen[doc.id]})", doc.line
        )
    seen[doc.id] = doc.source if doc.line is None else f"{doc.source}:{doc.line}"
    return doc


def _no_extension(suffix: str) -> str:
    return suffix or "(no extension)"


def iter_documents(root: Path, cfg: IngestConfig, report: dict[str, Any]) -> Iterator[Document]:
    """Read every supported file under ``root`` in sorted order (deterministic runs), one
    document at a time: memory holds one document (and the ids seen), not the corpus.

    Files with other extensions are listed in ``report["ignored_files"]`` and counted by
    extension in ``report["ignored_by_extension"]``. A bad document raises :class:`InputError`
    naming file and line or, with ``on_error: skip``, is listed in ``report["skipped"]`` with the
    reason. ``report["documents"]`` and ``report["by_format"]`` count what was read so far.
    """
    if not root.is_dir():
        raise InputError(root, "documents directory not found; set paths.documents")
    for key, empty in (("skipped", []), ("ignored_files", []), ("ignored_by_extension", {})):
        report.setdefault(key, empty)
    report["documents"] = 0
    report["by_format"] = {}
    seen: dict[str, str] = {}
    ignored: Counter[str] = Counter(report["ignored_by_extension"])
    formats: Counter[str] = Counter()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel_path = path.relative_to(root)
        if any(part.startswith(".") for part in rel_path.parts):
            continue
        suffix = path.suffix.lower()
        if suffix not in cfg.extensions:
            report["ignored_files"].append(rel_path.as_posix())
            ignored[_no_extension(suffix)] += 1
            report["ignored_by_extension"] = dict(sorted(ignored.items()))
            continue
        items = _READERS[suffix](path, rel_path.with_suffix("").as_posix(), cfg)
        while True:
            try:
                item = next(items, None)
            except InputError as e:  # an error of the whole file ends its reader
                item = e
            except OSError as e:
                item = InputError(path, f"cannot read it ({e.strerror})")
            if item is None:
                break
            try:
                if isinstance(item, InputError):
                    raise item
                doc = _normalized(item, cfg.unicode_form, seen)
            except InputError as e:
                if cfg.on_error == OnError.fail:
                    raise InputError(
                        e.path,
                        f"{e.reason}; fix it, or set ingest.on_error=skip to skip bad documents",
                        e.line,
                    ) from None
                report["skipped"].append({"file": e.path, "line": e.line, "reason": e.reason})
                continue
            formats[suffix] += 1
            report["documents"] += 1
            report["by_format"] = dict(sorted(formats.items()))
            yield doc


def read_documents(root: Path, cfg: IngestConfig, report: dict[str, Any]) -> list[Document]:
    """Every document of :func:`iter_documents` as a list (small corpora, tests, benchmarks)."""
    return list(iter_documents(root, cfg, report))
