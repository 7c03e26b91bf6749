"""Fine-tuning and the shared training loop on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from core.generation import encode_qa
from core.models import tiny_llm
from core.schema import QAItem
from training.finetune import FinetuneConfig, finetune
from training.loop import TrainConfig

ITEMS = [QAItem(question=f"Where was person {i} born?", answer=f"Person {i} was born in town {i}.") for i in range(8)]


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(train=TrainConfig(lr=3e-3, max_steps=12, batch_size=4, save_every=3, warmup_ratio=0.0, **kw))


def test_encode_qa_masks_prompt_and_matches_generation_ids():
    llm = tiny_llm(0)
    ex = encode_qa(llm.tokenizer, "Who?", "Me.")
    n_prompt = sum(1 for x in ex["labels"] if x == -100)
    prompt_ids = llm.tokenizer(llm.tokenizer.apply_chat_template([{"role": "user", "content": "Who?"}], tokenize=False,
                                                                  add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:n_prompt] == prompt_ids
    assert llm.tokenizer.decode(ex["input_ids"][n_prompt:]) == "Me.<|im_end|>"


def test_finetune_lowers_loss_and_writes_hf_checkpoint(tmp_path):
    llm = tiny_llm(0)
    res = finetune(llm.model, llm.tokenizer, ITEMS, _cfg(), tmp_path / "out")
    assert res.steps == 12
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < first * 0.8, (first, last)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (n, a), (_, b) in zip(llm.model.named_parameters(), reloaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert (tmp_path / "out" / "run_config.yaml").exists()
    assert not (tmp_path / "out.ckpt").exists()
    # A second call with the same config and data reuses the finished run.
    again = finetune(tiny_llm(0).model, llm.tokenizer, ITEMS, _cfg(), tmp_path / "out")
    assert again.steps == 12 and again.seconds == res.seconds


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    straight = tiny_llm(0)
    finetune(straight.model, straight.tokenizer, ITEMS, _cfg(), tmp_path / "a")
    interrupted = tiny_llm(0)
    part = finetune(interrupted.model, interrupted.tokenizer, ITEMS, _cfg(), tmp_path / "b", stop_after=7)
    assert part.steps == 7 and (tmp_path / "b.ckpt" / "progress.json").exists()
    assert not (tmp_path / "b").exists()
    resumed = tiny_llm(0)  # a fresh process would start from the base weights again
    res = finetune(resumed.model, resumed.tokenizer, ITEMS, _cfg(), tmp_path / "b")
    assert res.resumed_from == 6  # last checkpoint (save_every=3) before the interruption
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_trainable_patterns_freeze_the_rest(tmp_path):
    llm = tiny_llm(0)
    before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    finetune(llm.model, llm.tokenizer, ITEMS, _cfg(trainable=[r"layers\.1\.mlp\.down_proj"]), tmp_path / "o")
    for n, p in llm.model.named_parameters():
        if "layers.1.mlp.down_proj" in n:
            assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n


def test_lora_run_merges_into_plain_checkpoint(tmp_path):
    from training.loop import LoraSettings

    llm = tiny_llm(0)
    before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    cfg = FinetuneConfig(train=TrainConfig(lr=1e-2, max_steps=4, batch_size=4, lora=LoraSettings(r=4, alpha=8)))
    finetune(llm.model, llm.tokenizer, ITEMS, cfg, tmp_path / "lora")
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    names = [n for n, _ in out.named_parameters()]
    assert not any("lora" in n for n in names)
    changed = [n for n, p in out.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("proj" in n for n in changed)


def test_sft_loss_keeps_only_answer_logits_and_matches_the_full_loss():
    from core.generation import pad_batch
    from training.finetune import sft_loss

    llm = tiny_llm(0)
    exs = [encode_qa(llm.tokenizer, "Where was Ana born?", "Ana was born in Lower Alder."),
           encode_qa(llm.tokenizer, "Q?", "A much longer answer that runs on for a while.")]
    batch = pad_batch(exs, llm.tokenizer.pad_token_id or 0)
    full = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(sft_loss(llm.model, batch)["loss"].detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no answer tokens"):
        sft_loss(llm.model, batch)


def test_replay_pairs_are_the_models_own_whole_sentences_and_cached(tmp_path, monkeypatch):
    import training.finetune as ft

    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):  # noqa: ANN001, ANN202
        calls.append(list(prompts))
        return ["Paris is the capital. It is also", "no sentence end here", "Fine."]

    monkeypatch.setattr("core.generation.generate", fake_generate)
    llm = tiny_llm(0)
    cache = tmp_path / "replay.json"
    prompts = ["Capital of France?", "Say something", "How are you?"]
    pairs = ft.replay_pairs(llm.model, llm.tokenizer, prompts, 16, cache=cache)
    # Cut to whole sentences; an answer with no sentence end is dropped rather than taught half-finished.
    assert pairs == [("Capital of France?", "Paris is the capital."), ("How are you?", "Fine.")]
    assert ft.replay_pairs(llm.model, llm.tokenizer, prompts, 16, cache=cache) == pairs and len(calls) == 1
    ft.replay_pairs(llm.model, llm.tokenizer, prompts, 24, cache=cache)  # another length cap: regenerated
    assert len(calls) == 2


def test_finetune_mixes_a_seeded_sample_of_replay_prompts(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("training.finetune.replay_pairs",
                        lambda model, tok, prompts, n, cache=None, system=None: seen.append(list(prompts)) or
                        [(p, "Sure.") for p in prompts])
    llm = tiny_llm(0)
    replay = [f"General prompt {i}?" for i in range(10)]
    cfg = FinetuneConfig(replay=4, train=TrainConfig(lr=1e-3, max_steps=2, batch_size=4, save_every=2,
                                                     warmup_ratio=0.0))
    finetune(llm.model, llm.tokenizer, ITEMS, cfg, tmp_path / "out", replay=replay)
    assert len(seen[0]) == 4 and seen[0] == sorted(seen[0], key=replay.index)  # a sample, in file order
