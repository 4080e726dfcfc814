"""A general, out-of-domain retrieval set of real English text that nobody in this project wrote:
the docstrings of Python's standard library.

Each pair is one documented function, class or module of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``, parsed with :mod:`ast`, never imported; tests and
``site-packages`` left out):

* **query** — the docstring's summary (its first paragraph), e.g. "Block until the internal flag
  is true.";
* **passage** — the paragraphs that follow it (up to the first doctest), trimmed at a sentence end
  to at most ``max_words`` words, e.g. "If the internal flag is true on entry, return
  immediately. Otherwise, block until another thread calls set() ...".

A pair is kept only where both are substantial (a summary of 5–40 words, a passage of at least
``min_words`` words) and the passage does not repeat the summary word for word; repeated summaries
or passages are dropped. The task is "which description does this one-line summary introduce?"
among a few hundred descriptions of other library objects: short query to longer passage,
technical prose with a vocabulary unlike the corpus's, so a fine-tune that forgets general
English retrieval shows here.

The set is deterministic for a given standard library. Source files are read in the order of a
hash of their path (which spreads the set over the whole library), and each file's pairs go, all
of them, to whichever of two halves is smaller so far, until both hold ``pairs // 2``:
**selection** (what a build may choose with, e.g. the weight-interpolation mix) and **report**
(held out: only measured). The halves share no module, so the report half is a sample of the
library the choice never saw. A smaller set is the start of a larger one, and reading stops once
the halves are full (a small set costs a few files). :attr:`GeneralSet.digest` names the exact
text, so figures from different Python versions are never compared by mistake.

Torch-free: :func:`build` returns plain text; :meth:`sphana.embedding.ValidationSet.from_pairs`
turns a half into the same evaluation the in-domain validation set uses.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idle_test"})
SUMMARY_WORDS = (5, 40)  # a summary outside this range (words) is too terse or not a summary
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@dataclass(frozen=True)
class Pair:
    id: str  # "<path relative to the stdlib>:<qualified name>:<line>"
    query: str  # the docstring's summary paragraph, whitespace collapsed
    passage: str  # the paragraphs after it, trimmed


@dataclass(frozen=True)
class GeneralSet:
    selection: list[Pair]  # the half a build may choose with
    report: list[Pair]  # the held-out half (other modules): only measured, never chosen with
    files: dict[str, int]  # source files each half's pairs come from
    python: str  # interpreter version whose standard library this is
    digest: str  # sha256 of every selected pair's id, query and passage

    def describe(self) -> dict[str, object]:
        """Size and provenance, for metrics files."""
        pairs = [*self.selection, *self.report]
        return {
            "source": "docstrings of the Python standard library (summary -> description)",
            "python": self.python,
            "pairs": {"selection": len(self.selection), "report": len(self.report)},
            "files": self.files,
            "mean_query_words": round(sum(len(p.query.split()) for p in pairs) / len(pairs), 1),
            "mean_passage_words": round(sum(len(p.passage.split()) for p in pairs) / len(pairs), 1),
            "digest": self.digest,
        }


def stdlib_dir() -> Path:
    """The running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(stdlib: Path) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the library's ``.py`` files, tests and installed packages
    left out, in the order of a hash of the relative path."""
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if any(p in SKIPPED_DIRS or p.startswith("test") for p in rel.parts):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files, key=lambda f: hashlib.sha256(f[0].encode()).hexdigest())


def file_pairs(rel: str, path: Path, min_words: int, max_words: int) -> list[Pair]:
    """The substantial (summary, description) pairs of one source file, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=rel)
    except (SyntaxError, ValueError):  # e.g. a file kept for another Python version
        return []
    pairs = []
    for qualname, line, doc in _docstrings(tree):
        pair = _pair(doc, min_words, max_words)
        if pair is not None:
            pairs.append(Pair(f"{rel}:{qualname}:{line}", *pair))
    return pairs


def build(
    pairs: int, min_words: int = 40, max_words: int = 100, stdlib: Path | None = None
) -> GeneralSet:
    """Two halves of ``pairs // 2`` pairs each, from disjoint source files (see the module).

    Args:
        pairs: both halves together.
        min_words: shortest passage kept, in words.
        max_words: passages are trimmed to at most this many words.
        stdlib: the library to read; the running interpreter's by default.

    Raises:
        ValueError: when the library offers fewer than ``pairs`` (the halves would differ
            from run to run of a smaller config, or be empty).
    """
    stdlib = stdlib or stdlib_dir()
    want = pairs // 2
    halves: dict[str, list[Pair]] = {"selection": [], "report": []}
    files = {"selection": 0, "report": 0}
    seen: set[str] = set()  # queries and passages, lowercased: a repeat is dropped
    for rel, path in source_files(stdlib):
        if min(len(h) for h in halves.values()) >= want:
            break
        new = []
        for p in file_pairs(rel, path, min_words, max_words):
            if p.query.lower() not in seen and p.passage.lower() not in seen:
                seen.update((p.query.lower(), p.passage.lower()))
                new.append(p)
        if new:
            name = min(halves, key=lambda h: len(halves[h]))  # ties: selection
            halves[name].extend(new)
            files[name] += 1
    if want < 1 or min(len(h) for h in halves.values()) < want:
        raise ValueError(
            f"the standard library at {stdlib} offers {sum(map(len, halves.values()))} "
            f"docstring pairs of >= {min_words} words; embedding.ood_pairs = {pairs} needs "
            f"2 <= ood_pairs <= about that many"
        )
    selection, report = halves["selection"][:want], halves["report"][:want]
    digest = hashlib.sha256()
    for p in [*selection, *report]:
        digest.update(f"{p.id}\0{p.query}\0{p.passage}\0".encode())
    return GeneralSet(
        selection=selection,
        report=report,
        files=files,
        python=platform.python_version(),
        digest=digest.hexdigest(),
    )


def _docstrings(tree: ast.Module):
    """``(qualified name, line, cleaned docstring)`` of the module and every class and function,
    in source order."""
    stack: list[tuple[ast.AST, str]] = [(tree, "<module>")]
    while stack:
        node, name = stack.pop()
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            yield name, getattr(node, "lineno", 1), doc
        children = [
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        prefix = "" if name == "<module>" else f"{name}."
        stack.extend((child, f"{prefix}{child.name}") for child in reversed(children))


def _pair(doc: str, min_words: int, max_words: int) -> tuple[str, str] | None:
    """(summary, trimmed description) of a docstring, or None when either is not substantial."""
    paragraphs = [p for p in _PARAGRAPH.split(doc.strip()) if p.strip()]
    if len(paragraphs) < 2:
        return None
    query = " ".join(paragraphs[0].split())
    if not SUMMARY_WORDS[0] <= len(query.split()) <= SUMMARY_WORDS[1]:
        return None
    words: list[str] = []
    for paragraph in paragraphs[1:]:
        if paragraph[:1].isspace() or len(words) >= max_words:
            break  # an indented block is code, not prose
        lines = paragraph.splitlines()
        prose = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith(">>>")), None)
        words.extend(" ".join(lines[:prose]).split())
        if prose is not None:
            break  # a doctest: examples are code
    if len(words) > max_words:
        words = _trim(words, max_words, min_words)
    passage = " ".join(words)
    if len(words) < min_words or query.lower() in passage.lower():
        return None  # too short, or the answer repeats the question word for word
    return query, passage


def _trim(words: list[str], max_words: int, min_words: int) -> list[str]:
    """The first ``max_words`` words, cut back to the last sentence end if that keeps at least
    ``min_words``."""
    words = words[:max_words]
    for end in range(len(words), min_words - 1, -1):
        if _SENTENCE_END.search(words[end - 1]):
            return words[:end]
    return words
