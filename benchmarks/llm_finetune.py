"""How to fine-tune the pretrained generator on the corpus's chat turns: the recipes
``train_llm`` chose between, each timed and scored the same way.

    python benchmarks/llm_finetune.py full|lora|distractors [...] [--lr 1e-4] [--lora-lr 5e-4]
        [--save DIR]

After ``build_datasets`` (``make run``), from the repository root. Each recipe fine-tunes
``llm.base_model`` (SmolLM2-135M-Instruct by default) for one epoch on the training split's chat
turns, batch 8, AdamW, linear warm-up and decay, 2 threads:

- ``full``: every weight (what ``train_llm`` does);
- ``lora``: rank-16 adapters on every projection, merged afterwards (needs ``peft``: ``pip install
  --no-deps peft``; not a Sphana dependency);
- ``distractors``: every weight, each question's gold passage shuffled among two other passages
  of the training split (its own document's first), as ``query`` gives the generator three.

Prints the training time and the answers to the validation questions with the gold passage
(answer contained, exact match, token F1); ``--save DIR`` keeps each model for
``benchmarks/query_answers.py --generator DIR/<recipe>``. It asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sphana import llm
from sphana.config import validate
from sphana.generation import qa_prompt

RECIPES = ("full", "lora", "distractors")


def with_distractors(records: list[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """The chat turns with ``count`` other passages shuffled in beside the gold one."""
    passages = [r for r in records if r["kind"] == "passage"]
    by_doc: dict[str, list[str]] = {}
    for p in passages:
        by_doc.setdefault(p["doc_id"], []).append(p["text"])
    rng = random.Random(seed)
    out = []
    for r in records:
        if r["kind"] != "qa":
            continue
        context, question = r["prompt"].removeprefix("Context: ").split("\nQuestion: ")
        others = [t for t in by_doc.get(r["doc_id"], []) if t != context]
        rng.shuffle(others)
        others = others[:count]
        while len(others) < count:
            text = rng.choice(passages)["text"]
            if text != context and text not in others:
                others.append(text)
        contexts = [context, *others]
        rng.shuffle(contexts)
        out.append({**r, "prompt": qa_prompt("\n".join(contexts), question)})
    return out


def fine_tune(recipe: str, lr: float, cfg: Any, train: list, seed: int) -> tuple[Any, ...]:
    """The fine-tuned model, its tokenizer, its ``llm.meta`` and what the training took."""
    torch.manual_seed(seed)
    tokenizer = llm.load_tokenizer(cfg, [])
    model = llm.build_model(cfg, tokenizer)
    info = llm.meta(model, tokenizer, cfg.base_model, cfg.max_seq_length)
    pad_id = llm.special_ids(tokenizer)[llm.EOS_TEXT]
    if recipe == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    records = (
        with_distractors(train, 2, seed)
        if recipe == "distractors"
        else [r for r in train if r["kind"] == "qa"]
    )
    length = cfg.max_seq_length * (2 if recipe == "distractors" else 1)
    examples = llm.encode(tokenizer, records, length)
    random.Random(seed).shuffle(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch, steps = 8, -(-len(examples) // 8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 2) * max(0.0, 1 - s / steps)
    )
    start = time.perf_counter()
    model.train()
    for i in range(0, len(examples), batch):
        inputs = llm.collate(examples[i : i + batch], pad_id)
        labels = inputs.pop("labels")
        nll, n = llm.token_nll(model(**inputs).logits, labels)
        (nll / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    if recipe == "lora":
        model = model.merge_and_unload()
    report = {
        "examples": len(examples),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "trainable": sum(p.numel() for p in params),
        "seconds": round(seconds),
    }
    return model.eval(), tokenizer, info, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", choices=RECIPES)
    parser.add_argument("--lr", type=float, default=1e-4, help="full and distractors")
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = validate(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")))
    train, validation = llm.load_split(Path(cfg.paths.datasets) / "llm")
    for recipe in args.recipes:
        lr = args.lora_lr if recipe == "lora" else args.lr
        model, tokenizer, info, report = fine_tune(recipe, lr, cfg.llm, train, cfg.runtime.seed)
        answers = llm.answer_quality(llm.torch_step(model), tokenizer, info, validation)
        print(
            f"{recipe} (lr {lr:g}): {report['examples']} examples, {report['tokens']} tokens, "
            f"{report['trainable']:,} trainable parameters, {report['seconds']} s | gold passage: "
            f"contained {answers['answer_contained']:.3f}, exact match "
            f"{answers['answer_exact_match']:.3f}, token F1 {answers['answer_token_f1']:.3f}"
        )
        if args.save:
            llm.save(model, tokenizer, info, args.save / recipe)


if __name__ == "__main__":
    main()
