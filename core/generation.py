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


def encode_qa(tokenizer: Any, question: Prompt, answer: str, system: str | None = None,
              max_length: int = 256) -> dict[str, list[int]]:
    """Token ids of a chat-formatted QA pair with labels on the answer only (-100 on the prompt).

    The prompt and the answer are tokenized separately and concatenated, so the ids are exactly
    what the model sees when it generates the answer after the prompt.
    """
    prompt_ids = tokenizer(chat_text(tokenizer, question, system), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token or ""
    answer_ids = tokenizer(answer + eos, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad encoded examples into tensors with an attention mask (for teacher forcing)."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e.get("labels", e["input_ids"]))
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
