"""Gold questions: read ``<paths.gold>/questions.jsonl`` and resolve each relevant span to the
ingested chunks that contain it (``ingest`` writes them to ``<paths.ingest>/questions.jsonl``).

A gold question is ``{"id", "question", "relevant": [{"doc_id", "section", "start", "end"}],
"answer"?}`` (offsets index the normalized section text, see data/README.md); resolved, it is
``{"id", "question", "answer", "relevant": [{"doc_id", "chunk_ids"}]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sphana.errors import InputError
from sphana.io import read_jsonl


def resolve_questions(
    path: Path, chunks_by_doc: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Read gold questions and resolve each relevant span to the chunks that contain it."""
    questions = []
    seen: set[str] = set()
    for lineno, q in read_jsonl(path):
        for key, kind in (("id", str), ("question", str), ("relevant", list)):
            if not isinstance(q.get(key), kind) or not q[key]:
                raise InputError(path, f"field '{key}' must be a non-empty {kind.__name__}", lineno)
        if q["id"] in seen:
            raise InputError(path, f"duplicate question id {q['id']!r}", lineno)
        seen.add(q["id"])
        resolved = []
        for i, rel in enumerate(q["relevant"]):
            where = f"relevant[{i}]"
            if not isinstance(rel, dict) or not all(k in rel for k in ("doc_id", "start", "end")):
                raise InputError(path, f"{where} needs doc_id, section, start, end", lineno)
            if not isinstance(rel["doc_id"], str) or not isinstance(rel.get("section", ""), str):
                raise InputError(path, f"{where}: doc_id and section must be strings", lineno)
            doc_chunks = chunks_by_doc.get(rel["doc_id"])
            if doc_chunks is None:
                raise InputError(
                    path,
                    f"{where}: document {rel['doc_id']!r} is not in the "
                    "ingested corpus (check the id or paths.documents)",
                    lineno,
                )
            section = [c for c in doc_chunks if c["section"] == rel.get("section", "")]
            if not section:
                raise InputError(
                    path,
                    f"{where}: document {rel['doc_id']!r} has no section "
                    f"{rel.get('section', '')!r}",
                    lineno,
                )
            start, end = rel["start"], rel["end"]
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
                raise InputError(
                    path, f"{where}: start/end must be integers, 0 <= start < end", lineno
                )
            containing = [c["id"] for c in section if c["start"] <= start and end <= c["end"]]
            if not containing:  # evidence longer than one chunk: take the chunk overlapping most
                best = max(section, key=lambda c: min(end, c["end"]) - max(start, c["start"]))
                if min(end, best["end"]) <= max(start, best["start"]):
                    raise InputError(
                        path,
                        f"{where}: span {start}:{end} is outside section "
                        f"{rel.get('section', '')!r} of {rel['doc_id']!r}",
                        lineno,
                    )
                containing = [best["id"]]
            resolved.append({"doc_id": rel["doc_id"], "chunk_ids": containing})
        answer = q.get("answer")
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            raise InputError(path, "field 'answer' must be a non-empty string when given", lineno)
        questions.append(
            {"id": q["id"], "question": q["question"], "answer": answer, "relevant": resolved}
        )
    return questions


def chunk_index(chunks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Chunks by document, as :func:`resolve_questions` looks them up."""
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for c in chunks:
        by_doc.setdefault(c["doc_id"], []).append(c)
    return by_doc


def signals(questions: int, answers: int, labelled_pairs: int) -> dict[str, str]:
    """Where each component's training signal comes from, given the gold the corpus has."""
    return {
        "embedding": (
            "gold questions + self-supervised pairs from the documents"
            if questions
            else "self-supervised pairs from the documents (title/heading -> section, "
            "sentence -> its passage)"
        ),
        "gnn": "gold questions" if questions else "pseudo-queries from the documents",
        "relation": (
            "gold relation labels"
            if labelled_pairs
            else "none: not trained without labelled entity pairs (relations.jsonl)"
        ),
        "llm": "passages + gold question-answer turns" if answers else "passages only",
    }


def summary(
    questions_file: Path | None,
    questions: list[dict[str, Any]],
    relations_file: Path | None,
    relations_report: dict[str, Any],
) -> dict[str, Any]:
    """What the corpus has of each kind of gold annotation and what each component learns from:
    ``ingest``'s ``report.json`` ``gold`` section, repeated by the manifest."""
    answers = sum(q["answer"] is not None for q in questions)
    labelled = relations_report["labelled"]
    return {
        "questions": {
            "file": str(questions_file) if questions_file else None,
            "present": bool(questions_file and questions_file.is_file()),
            "count": len(questions),
            "with_answer": answers,
        },
        "relations": {
            "file": str(relations_file) if relations_file else None,
            "present": bool(relations_file and relations_file.is_file()),
            "labelled_pairs": labelled,
        },
        "signals": signals(len(questions), answers, labelled),
    }
