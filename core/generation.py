"""Batched chat generation with Hugging Face models: the one place prompts become token ids."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

Message = dict[str, Any]
"""An OpenAI chat message: ``role`` and ``content`` (a string, a list of content parts or None), and on
assistant turns optionally ``tool_calls``, on tool turns ``tool_call_id``."""
Prompt = str | Sequence[Message]

TEXT_PARTS = ("text", "refusal")
"""Content-part types that carry text (``{"type": "text", "text": ...}``, an assistant's ``refusal`` part); any
other part (``image_url``, ``input_audio``, ``file``...) is non-text content."""


def has_non_text(message: Mapping[str, Any]) -> bool:
    """Whether a message carries non-text content parts (images, audio, files), which no detector reads."""
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") not in TEXT_PARTS
                                             for p in content)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a part list joined by newlines, so that a
    detector and a local model read what a client wrote; non-text parts carry no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        out = []
        for p in content:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, Mapping):
                text = p.get(p.get("type")) if p.get("type") in TEXT_PARTS else p.get("text")
                if isinstance(text, str):
                    out.append(text)
        return "\n".join(out)
    raise TypeError(f"message content must be a string, a list of content parts or null, got {type(content).__name__}")


def _flat_values(value: Any) -> list[str]:
    """The strings, numbers and keys of a JSON value, in order (what a reader of it sees, without the syntax)."""
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (str(k), *_flat_values(v))]
    if isinstance(value, list):
        return [s for v in value for s in _flat_values(v)]
    return [] if value is None else [str(value)]


def json_text(text: str) -> str:
    """A JSON document as readable text (``key: value`` words, no punctuation) when it parses, else the text itself:
    a leak check must read a fact inside JSON output or tool arguments as it reads prose."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(value, Mapping | list):
        return text
    return " ".join(_flat_values(value))


def tool_call_text(call: Any) -> str:
    """The text of one tool call (``{"function": {"name", "arguments"}}``): its name and its arguments' words."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping):
        return ""
    name = fn.get("name") if isinstance(fn.get("name"), str) else ""
    args = fn.get("arguments")
    args = args if isinstance(args, str) else json.dumps(args) if args is not None else ""
    return f"{name}: {json_text(args)}".strip(": ")


def tools_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The text of tool definitions (names, descriptions, parameter names and descriptions): the target reads it, so
    the detector judges it as a system turn."""
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, Mapping) else None
        if isinstance(fn, Mapping):
            params = fn.get("parameters")
            words = " ".join(_flat_values(params)) if isinstance(params, Mapping) else ""
            out.append(" ".join(str(x) for x in (fn.get("name"), fn.get("description"), words) if x))
    return "\n".join(out)


def turn_text(message: Mapping[str, Any]) -> str:
    """All the text of one chat message: its participant ``name``, its content's text and, on an assistant turn, its
    tool calls' names and arguments (every part a detector must judge)."""
    name = message.get("name")
    parts = [name if isinstance(name, str) else "", content_text(message.get("content"))]
    calls = message.get("tool_calls")
    if isinstance(calls, Sequence) and not isinstance(calls, str):
        parts.extend(tool_call_text(c) for c in calls)
    fc = message.get("function_call")  # the deprecated single-call field
    if isinstance(fc, Mapping):
        parts.append(tool_call_text({"function": fc}))
    return "\n".join(p for p in parts if p)


def as_messages(prompt: Prompt, system: str | None = None) -> list[Message]:
    """Normalise a prompt (a string or chat messages) to a list of chat messages."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        msgs = [m for m in msgs if m["role"] != "system"]
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def text_turns(messages: Sequence[Message]) -> list[Message]:
    """Messages as plain text turns (role and a content string: text parts joined, tool calls written out), which
    every chat template renders; plain messages are returned as they are."""
    return [m if isinstance(m.get("content"), str) and not m.get("tool_calls") else
            {"role": m["role"], "content": turn_text(m)} for m in messages]


def chat_text(tokenizer: Any, prompt: Prompt, system: str | None = None, add_generation_prompt: bool = True) -> str:
    """Render a prompt with the tokenizer's chat template, ready for generation (content parts and tool calls as
    text: see :func:`text_turns`)."""
    return tokenizer.apply_chat_template(text_turns(as_messages(prompt, system)), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def generate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int = 64,
             batch_size: int = 16, system: str | None = None, temperature: float = 0.0,
             progress: bool = False, desc: str = "generate", prefixes: Sequence[str] | None = None,
             stop_at_newline: bool = False) -> list[str]:
    """Answer chat prompts in length-sorted, left-padded batches (greedy unless ``temperature`` > 0).

    ``prefixes`` (one per prompt) start each answer, so the model continues them (returned without the prefix);
    ``stop_at_newline`` ends an answer at its first line break (and cuts it there).
    """
    import torch

    if prefixes is not None and len(prefixes) != len(prompts):
        raise ValueError(f"prefixes: got {len(prefixes)} for {len(prompts)} prompts; give one per prompt or none")
    texts = [chat_text(tokenizer, p, system) + (prefixes[i] if prefixes is not None else "")
             for i, p in enumerate(prompts)]
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
        if stop_at_newline:
            kw.update(stop_strings=["\n"], tokenizer=tokenizer)
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            out[i] = (text.lstrip("\n").split("\n")[0] if stop_at_newline else text).strip()
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
