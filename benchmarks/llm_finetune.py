"""How to fine-tune the pretrained generator on the corpus's chat turns: the recipes
``train_llm`` chose between, each timed and scored the same way.

    python benchmarks/llm_finetune.py full|lora|distractors [...] [--lr LR] [--lora-lr 5e-4]
        [--save DIR]

After ``build_datasets`` (``make run``), from the repository root. Each recipe fine-tunes
``llm.base_model`` (SmolLM2-135M-Instruct by default) for one epoch on the training split's chat
turns with the ``llm`` settings (batch 8, AdamW, linear warm-up and decay) through the same
runtime ``fit`` and loss as ``train_llm``, on the ``runtime`` settings (2 threads):

- ``full``: every weight (what ``train_llm`` does: without ``--lr``, at ``llm.lr``, the same model);
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
import dataclasses
import functools
import random
import tempfile
from pathlib import Path
from typing import Any

import yaml

from sphana import llm
from sphana import runtime as rt
from sphana.config import Resume, validate
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


def fine_tune(recipe: str, lr: float, cfg: Any, runtime: Any, train: list, work: Path) -> tuple:
    """The fine-tuned model, its tokenizer, its ``llm.meta`` and what the training took: one epoch
    of ``llm`` settings (``lr`` aside) through the runtime's ``fit``, as ``train_llm`` trains."""
    device = rt.setup(runtime)
    tokenizer = llm.load_tokenizer(cfg, [])
    model = llm.build_model(cfg, tokenizer)
    info = llm.meta(model, tokenizer, cfg.base_model, cfg.max_seq_length)
    if recipe == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    records = (
        with_distractors(train, 2, runtime.seed)
        if recipe == "distractors"
        else [r for r in train if r["kind"] == "qa"]
    )
    length = cfg.max_seq_length * (2 if recipe == "distractors" else 1)
    examples = llm.encode(tokenizer, records, length)
    job = rt.Job.for_component(
        f"llm_{recipe}",
        dataclasses.replace(cfg, lr=lr, epochs=1),
        model=model,
        examples=examples,
        loss=functools.partial(llm.lm_loss, pad_id=llm.special_ids(tokenizer)[llm.EOS_TEXT]),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = rt.fit(job, runtime, device, work / "checkpoints", work / "live", work / "profiles")
    model = result.model.cpu()
    if recipe == "lora":
        model = model.merge_and_unload()
    report = {
        "examples": len(examples),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "trainable": trainable,
        "seconds": round(result.seconds - result.checkpoint_seconds),
    }
    return model.eval(), tokenizer, info, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", choices=RECIPES)
    parser.add_argument("--lr", type=float, help="full and distractors (default: llm.lr)")
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    cfg = validate(yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")))
    train, validation = llm.load_split(Path(cfg.paths.datasets) / "llm")
    runtime = dataclasses.replace(cfg.runtime, resume=Resume.never)
    for recipe in args.recipes:
        lr = args.lora_lr if recipe == "lora" else (args.lr or cfg.llm.lr)
        with tempfile.TemporaryDirectory() as work:  # its checkpoints: not train_llm's
            model, tokenizer, info, report = fine_tune(
                recipe, lr, cfg.llm, runtime, train, Path(work)
            )
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
