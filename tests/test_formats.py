"""Document formats of ``ingest`` (HTML, PDF, undecodable and unknown files) and the parse cache
of a growing corpus, on real files made here from real text: the GNU GPL v3 and Apache 2.0 texts
of Debian's base-files (/usr/share/common-licenses) and Python standard-library docstrings."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO

from sphana.config import IngestConfig, OnError, compose, validate
from sphana.documents import read_documents
from sphana.errors import InputError
from sphana.ingest import run

LICENSES = Path("/usr/share/common-licenses")
# what must never reach a chunk: navigation, banners, scripts, styles, forms, hidden elements
BOILERPLATE = (
    "Skip to content",
    "Licenses index",
    "trackVisit",
    "font-family",
    "Subscribe to updates",
    "Printer-friendly",
    "Cookie settings",
    "Site map and copyright notice",
)


@pytest.fixture(scope="module")
def tiny() -> IngestConfig:
    """The shipped ``ingest=tiny`` config."""
    return validate(compose(REPO / "conf", ["ingest=tiny"])).ingest


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def gpl() -> tuple[str, list[str], list[tuple[str, list[str]]]]:
    """The GPL v3: title, preamble paragraphs, and its terms as (heading, paragraphs)."""
    text = (LICENSES / "GPL-3").read_text(encoding="utf-8")
    text = text[: text.index("END OF TERMS AND CONDITIONS")]
    blocks = [_flat(b) for b in re.split(r"\n\s*\n", text) if b.strip()]
    title = blocks[0].split(" Version")[0]  # GNU GENERAL PUBLIC LICENSE
    terms_at = blocks.index("TERMS AND CONDITIONS")
    preamble = [b for b in blocks[1:terms_at] if b != "Preamble"]
    sections: list[tuple[str, list[str]]] = []
    for block in blocks[terms_at + 1 :]:
        if re.fullmatch(r"\d+\. [^.]+\.", block):
            sections.append((block, []))
        else:
            sections[-1][1].append(block)
    return title, preamble, sections


def stdlib_docstrings(module: str) -> tuple[str, list[tuple[str, str]]]:
    """A standard-library module's docstring and its documented functions' (name, docstring)."""
    path = Path(sys.modules[module].__file__ or "")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [
        (node.name, ast.get_docstring(node) or "")
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node)
    ]
    return ast.get_docstring(tree) or "", functions


def write_html(path: Path, title: str, sections: list[tuple[str, list[str]]]) -> None:
    body = "".join(
        f"<h2>{heading}</h2>\n" + "".join(f"<p>{p}</p>\n" for p in paragraphs)
        for heading, paragraphs in sections
    )
    path.write_text(
        f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: serif }}</style>
<script>function trackVisit() {{ return 1; }}</script></head>
<body>
<header><a href="#main">Skip to content</a> <a href="/">Licenses index</a></header>
<nav><ul><li><a href="/gpl">GPL</a></li><li>Printer-friendly</li></ul></nav>
<main><article>
<h1>{title}</h1>
{body}
<div style="display: none">Cookie settings</div>
<form><input name="email"><button>Subscribe to updates</button></form>
</article></main>
<aside>Subscribe to updates</aside>
<footer><p>Site map and copyright notice</p><noscript>trackVisit</noscript></footer>
</body></html>
""",
        encoding="utf-8",
    )


def write_pdf(
    path: Path,
    paragraphs_by_section: list[tuple[str, list[str]]],
    *,
    meta_title: str | None = None,
    first_line: str | None = None,
    outline: bool = True,
    heading_lines: bool = True,
    page_break_per_section: bool = True,
) -> None:
    """A real PDF (fpdf2: wrapped lines, running head and page numbers on every page)."""
    from fpdf import FPDF

    class Licence(FPDF):
        def header(self) -> None:
            if first_line and self.page_no() == 1:  # a title page has no running head
                return
            self.set_font("Helvetica", "I", 8)
            self.cell(0, 8, "GNU General Public License version 3", align="C")
            self.ln(10)

        def footer(self) -> None:
            self.set_y(-15)
            self.set_font("Helvetica", "I", 8)
            self.cell(0, 10, f"{self.page_no()}", align="C")

    pdf = Licence()
    if meta_title:
        pdf.set_title(meta_title)
    pdf.add_page()
    if first_line:
        pdf.set_font("Helvetica", "B", 16)
        pdf.multi_cell(0, 9, first_line)
        pdf.ln(4)
    for i, (heading, paragraphs) in enumerate(paragraphs_by_section):
        if page_break_per_section and i:
            pdf.add_page()
        if outline:
            pdf.start_section(heading)
        if heading_lines:
            pdf.set_font("Helvetica", "B", 13)
            pdf.multi_cell(0, 8, heading)
            pdf.ln(2)
        pdf.set_font("Helvetica", size=10)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 5, paragraph)
            pdf.ln(3)
    pdf.output(str(path))


# --- HTML --------------------------------------------------------------------------------------


def test_html_title_sections_paragraphs_and_no_boilerplate(tmp_path: Path, tiny) -> None:
    title, _, sections = gpl()
    docs = tmp_path / "docs"
    docs.mkdir()
    write_html(docs / "gpl.html", "GNU General Public License", sections[:4])
    report = run(tiny, docs, tmp_path / "out")
    [doc] = read_documents(docs, tiny, {})
    assert (
        doc.title == "GNU General Public License"
    )  # <title>; the <h1> repeating it opens no section
    assert [s.heading for s in doc.sections] == [h for h, _ in sections[:4]]
    for section, (_, paragraphs) in zip(doc.sections, sections[:4], strict=True):
        assert section.text.split("\n\n") == paragraphs  # one paragraph per <p>
    chunks = (tmp_path / "out/chunks.jsonl").read_text(encoding="utf-8")
    assert report["by_format"] == {".html": 1} and report["chunks"] > 4
    for text in BOILERPLATE:
        assert text not in chunks


def test_html_title_from_h1_declared_charset_and_utf8_bom(tmp_path: Path) -> None:
    intro, functions = stdlib_docstrings("textwrap")
    name, doc = functions[0]
    (tmp_path / "a.htm").write_bytes(
        b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
        b"</head><body><h1>textwrap caf\xe9</h1><p>"
        + intro.encode("latin-1")
        + f"</p><h3>{name}</h3><pre>{doc}</pre></body></html>".encode("latin-1")
    )
    (tmp_path / "b.md").write_bytes(b"\xef\xbb\xbf# Bom title\n\n" + intro.encode())
    a, b = read_documents(tmp_path, IngestConfig(), {})
    assert a.title == "textwrap café"  # no <title>: the first <h1>
    assert [s.heading for s in a.sections] == ["", name]
    assert a.sections[1].text == _flat(doc)
    assert b.title == "Bom title"  # a UTF-8 byte-order mark is not part of the text


# --- PDF ---------------------------------------------------------------------------------------


def test_pdf_outline_gives_sections_and_metadata_the_title(tmp_path: Path, tiny) -> None:
    _, _, sections = gpl()
    write_pdf(tmp_path / "gpl.pdf", sections[:3], meta_title="GNU GPL version 3")
    [doc] = read_documents(tmp_path, tiny, {})
    assert doc.title == "GNU GPL version 3"
    assert [s.heading for s in doc.sections] == [h for h, _ in sections[:3]]
    for section, (_, paragraphs) in zip(doc.sections, sections[:3], strict=True):
        assert _flat(section.text) == " ".join(paragraphs)  # heading line not repeated
        assert "\n\n" in section.text  # paragraph ends recovered from short last lines
    everything = " ".join(s.text for s in doc.sections)
    assert "General Public License version 3" not in everything  # the running head
    assert not re.search(r"(^|\n)\d+(\n|$)", everything)  # page numbers


def test_pdf_without_outline_uses_heading_lines_and_the_first_line(tmp_path: Path) -> None:
    title, preamble, sections = gpl()
    write_pdf(
        tmp_path / "gpl.pdf",
        [("Preamble", preamble[:2]), *sections[:8]],  # 5 pages: running heads on 4
        first_line=title,
        outline=False,
        page_break_per_section=False,
    )
    [doc] = read_documents(tmp_path, IngestConfig(), {})
    assert doc.title == title  # GNU GENERAL PUBLIC LICENSE: no metadata title
    assert [s.heading for s in doc.sections] == ["", *(h for h, _ in sections[:8])]
    assert _flat(doc.sections[0].text) == "Preamble " + " ".join(preamble[:2])
    assert _flat(doc.sections[2].text) == " ".join(sections[1][1])


def test_pdf_without_outline_or_headings_groups_pages(tmp_path: Path) -> None:
    _, preamble, _ = gpl()
    pages = [(f"page {i}", preamble[i : i + 2]) for i in range(0, 6, 2)]
    write_pdf(
        tmp_path / "preamble.pdf",
        pages,
        meta_title="GPL preamble",
        outline=False,
        heading_lines=False,
    )
    [doc] = read_documents(tmp_path, IngestConfig(pdf_pages_per_section=2), {})
    assert [s.heading for s in doc.sections] == ["Pages 1-2", "Page 3"]
    assert _flat(" ".join(s.text for s in doc.sections)) == " ".join(preamble[:6])


def test_pdf_needs_pypdf_and_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    _, preamble, _ = gpl()
    write_pdf(tmp_path / "a.pdf", [("x", preamble[:1])], meta_title="A", outline=False)
    (tmp_path / "b.md").write_text("# B\n\n" + preamble[1], encoding="utf-8")
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf fails
    with pytest.raises(InputError, match=r"a\.pdf: .*pip install 'sphana\[pdf\]'"):
        read_documents(tmp_path, IngestConfig(), {})
    report: dict = {}
    docs = read_documents(tmp_path, IngestConfig(on_error=OnError.skip), report)
    assert [d.id for d in docs] == ["b"]
    assert "pip install 'sphana[pdf]'" in report["skipped"][0]["reason"]


def test_a_file_that_is_not_a_pdf(tmp_path: Path) -> None:
    (tmp_path / "fake.pdf").write_bytes((LICENSES / "Apache-2.0").read_bytes())
    with pytest.raises(InputError, match=r"fake\.pdf: unreadable PDF"):
        read_documents(tmp_path, IngestConfig(), {})


# --- undecodable, binary and unknown files -----------------------------------------------------


@pytest.mark.parametrize("suffix", [".md", ".txt", ".json", ".jsonl", ".html"])
def test_non_utf8_and_binary_files_name_the_file_and_byte(tmp_path: Path, suffix: str) -> None:
    intro, _ = stdlib_docstrings("difflib")
    text = intro[:200] + " Zoë."
    content = {
        ".md": f"# Title\n\n{text}\n",
        ".txt": f"Title\n\n{text}\n",
        ".json": json.dumps({"title": "T", "text": text}, ensure_ascii=False),
        ".jsonl": json.dumps({"title": "T", "text": "ok"})
        + "\n"
        + json.dumps({"title": "T", "text": text}, ensure_ascii=False)
        + "\n",
        ".html": f"<title>T</title><p>{text}</p>",
    }[suffix]
    latin1 = content.encode("latin-1")
    at = latin1.index(b"\xeb")
    line = 2 if suffix == ".jsonl" else None
    (tmp_path / f"latin1{suffix}").write_bytes(latin1)
    with pytest.raises(InputError) as info:
        read_documents(tmp_path, IngestConfig(), {})
    where = f"latin1{suffix}:{line}" if line else f"latin1{suffix}"
    assert f"{where}: not UTF-8 (invalid continuation byte at byte {at})" in str(info.value)
    assert "iconv" in str(info.value) and "ingest.on_error=skip" in str(info.value)

    (tmp_path / f"latin1{suffix}").unlink()
    binary = content.encode() + b"\x00\x01\x02"
    (tmp_path / f"binary{suffix}").write_bytes(binary)
    report: dict = {}
    docs = read_documents(tmp_path, IngestConfig(on_error=OnError.skip), report)
    assert len(docs) == (2 if suffix == ".jsonl" else 0)  # a .jsonl skips only the bad line
    [skipped] = report["skipped"]
    nul = binary.index(b"\x00")
    assert skipped["file"].endswith(f"binary{suffix}")
    assert f"binary data (NUL byte at byte {nul})" in skipped["reason"]


def mixed_corpus(root: Path) -> dict[str, str]:
    """Every format, from real text; returns the id -> title of each good document."""
    title, preamble, sections = gpl()
    intro, functions = stdlib_docstrings("json")
    root.mkdir(parents=True)
    (root / "json-module.md").write_text(
        "# The json module\n\n" + intro + "".join(f"\n\n## {n}\n\n{d}" for n, d in functions),
        encoding="utf-8",
    )
    (root / "preamble.txt").write_text(
        "GPL preamble\n\n" + "\n\n".join(preamble[:3]) + "\n\n== Purpose ==\n\n" + preamble[3],
        encoding="utf-8",
    )
    (root / "apache.json").write_text(
        json.dumps({"id": "apache", "title": "Apache License 2.0", "text": _apache()[:3000]}),
        encoding="utf-8",
    )
    (root / "many.jsonl").write_text(
        "".join(
            json.dumps({"id": f"term-{i}", "title": h, "text": "\n\n".join(ps)}) + "\n"
            for i, (h, ps) in enumerate(sections[4:6])
        ),
        encoding="utf-8",
    )
    write_html(root / "gpl.html", "GNU GPL terms", sections[:2])
    write_html(root / "more.htm", "More GPL terms", sections[2:4])
    write_pdf(root / "gpl-pdf.pdf", sections[6:8], meta_title="GPL terms as PDF")
    (root / "table.csv").write_text("license,version\nGPL,3\nApache,2.0\n", encoding="utf-8")
    (root / "Makefile").write_text("all:\n\ttrue\n", encoding="utf-8")
    return {
        "json-module": "The json module",
        "preamble": "GPL preamble",
        "apache": "Apache License 2.0",
        "term-0": sections[4][0],
        "term-1": sections[5][0],
        "gpl": "GNU GPL terms",
        "more": "More GPL terms",
        "gpl-pdf": "GPL terms as PDF",
    }


def _apache() -> str:
    return (LICENSES / "Apache-2.0").read_text(encoding="utf-8")


def add_bad_files(root: Path) -> tuple[int, int]:
    """A binary file and a Latin-1 one, with text extensions; returns their bad byte offsets."""
    binary = Path(sys.executable).resolve().read_bytes()[:4096]  # an ELF header: NUL bytes
    (root / "bad-binary.md").write_bytes(binary)
    latin1 = ("Fran\u00e7ais\n\n" + _apache()[:800]).encode("latin-1")
    (root / "bad-latin1.txt").write_bytes(latin1)
    return binary.index(b"\x00"), latin1.index(b"\xe7")


def test_mixed_corpus_fails_naming_the_file_or_skips_and_reports(tmp_path: Path, tiny) -> None:
    docs, out = tmp_path / "docs", tmp_path / "out"
    expected = mixed_corpus(docs)
    nul, latin = add_bad_files(docs)

    with pytest.raises(InputError) as info:
        run(tiny, docs, out)
    message = str(info.value)
    assert f"bad-binary.md: binary data (NUL byte at byte {nul})" in message
    assert "ingest.on_error=skip" in message
    assert not (out / "chunks.jsonl").exists() and not (out / "relations.jsonl").exists()

    skip = dataclasses.replace(tiny, on_error=OnError.skip)
    report = run(skip, docs, out)
    assert report["documents"] == len(expected)
    assert report["by_format"] == {
        ".htm": 1,
        ".html": 1,
        ".json": 1,
        ".jsonl": 2,
        ".md": 1,
        ".pdf": 1,
        ".txt": 1,
    }
    assert report["ignored_files"] == ["Makefile", "table.csv"]
    assert report["ignored_by_extension"] == {"(no extension)": 1, ".csv": 1}
    assert [
        (Path(s["file"]).name, re.split("[:;]", s["reason"])[0]) for s in report["skipped"]
    ] == [
        ("bad-binary.md", f"binary data (NUL byte at byte {nul})"),
        ("bad-latin1.txt", f"not UTF-8 (invalid continuation byte at byte {latin})"),
    ]
    assert (report["skipped_count"], report["ignored_count"]) == (2, 2)
    chunks = [json.loads(x) for x in (out / "chunks.jsonl").read_text().splitlines()]
    assert {c["doc_id"]: c["title"] for c in chunks} == expected
    saved = json.loads((out / "report.json").read_text())
    assert saved["ignored_by_extension"] == report["ignored_by_extension"]


def test_a_failed_run_leaves_the_previous_outputs(tmp_path: Path, tiny) -> None:
    docs, out = tmp_path / "docs", tmp_path / "out"
    mixed_corpus(docs)
    run(tiny, docs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    add_bad_files(docs)
    with pytest.raises(InputError, match="bad-binary.md"):
        run(tiny, docs, out)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # chunks, relations, questions and report: all or nothing


# --- the parse cache of a growing corpus -------------------------------------------------------


def test_adding_a_document_parses_only_its_sections(tmp_path: Path, tiny) -> None:
    docs, out = tmp_path / "docs", tmp_path / "out"
    mixed_corpus(docs)
    first = run(tiny, docs, out)
    assert first["relations"]["parse_cache"]["hits"] == 0
    old_relations = (out / "relations.jsonl").read_text().splitlines()

    intro, functions = stdlib_docstrings("difflib")
    (docs / "difflib.md").write_text(
        "# The difflib module\n\n" + intro + "".join(f"\n\n## {n}\n\n{d}" for n, d in functions),
        encoding="utf-8",
    )
    [added] = [d for d in read_documents(docs, tiny, {}) if d.id == "difflib"]
    second = run(tiny, docs, out)
    cache = second["relations"]["parse_cache"]
    distinct = {s.text for s in added.sections}  # difflib repeats a docstring: parsed once
    assert cache["misses"] == len(distinct) > 1
    assert cache["hits"] == first["sections"] + len(added.sections) - len(distinct)
    assert second["documents"] == first["documents"] + 1
    new_relations = (out / "relations.jsonl").read_text().splitlines()
    assert [r for r in new_relations if json.loads(r)["doc_id"] != "difflib"] == old_relations


def test_every_extension_the_config_accepts_has_a_reader() -> None:
    from sphana.documents import _READERS

    assert IngestConfig(extensions=list(_READERS)).extensions == list(_READERS)
    assert set(IngestConfig().extensions) == set(_READERS)  # all read by default
    with pytest.raises(ValueError, match=r"unsupported \['\.csv'\]"):
        IngestConfig(extensions=[".md", ".csv"])


def test_a_damaged_parse_cache_line_is_parsed_again_and_repaired(tmp_path: Path) -> None:
    from sphana.documents import Document, Section
    from sphana.entities import ParseCache, SimpleParser, extract

    _, functions = stdlib_docstrings("textwrap")
    doc = Document("t", "textwrap", [Section(n, _flat(d)) for n, d in functions], "mem")
    parser = SimpleParser()
    first = ParseCache(tmp_path, parser.version)
    expected = extract([doc], parser, first, None, 400).records
    first.save()
    lines = first.path.read_bytes().splitlines(keepends=True)
    first.path.write_bytes(b"".join([lines[0][:90] + b"\n", *lines[1:]]))  # a line cut short
    damaged = ParseCache(tmp_path, parser.version)
    assert extract([doc], parser, damaged, None, 400).records == expected
    assert (damaged.hits, damaged.misses) == (len(lines) - 1, 1)
    damaged.save()
    repaired = ParseCache(tmp_path, parser.version)
    extract([doc], parser, repaired, None, 400)
    assert (repaired.hits, repaired.misses) == (len(lines), 0)
    repaired.close()
