"""Batched chat generation with Hugging Face models: the one place prompts become token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

Message = dict[str, str]
Prompt = str | Sequence[Message]


def as_messages(prompt: Prompt, system: str | None = None) -> list[Message]:
    """Normalise a prompt (a string or chat messages) to a list of chat messages."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        msgs = [m for m in msgs if m["role"] != "system"]
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def chat_text(tokenizer: Any, prompt: Prompt, system: str | None = None, add_generation_prompt: bool = True) -> str:
    """Render a prompt with the tokenizer's chat template, ready for generation."""
    return tokenizer.apply_chat_template(as_messages(prompt, system), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def generate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int = 64,
             batch_size: int = 16, system: str | None = None, temperature: float = 0.0,
             progress: bool = False, desc: str = "generate") -> list[str]:
    """Answer chat prompts in length-sorted, left-padded batches (greedy unless ``temperature`` > 0)."""
    import torch

    texts = [chat_text(tokenizer, p, system) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    bar = tqdm(total=len(texts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new, strict=True):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return out
