"""The chat API's optional features on the local backends: transformers (tiny random model) and vLLM's request mapping
(a stand-in engine: no vLLM engine starts here)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from core.generation import chat_text
from core.models import tiny_llm
from guard.backends import GenParams
from guard.backends.transformers import (
    LogitBiasLogitsProcessor,
    PenaltyLogitsProcessor,
    TransformersBackend,
    parse_logit_bias,
)
from guard.types import BackendError

MSGS = [{"role": "user", "content": "Where was the author born?"}]
RAW = "The quick brown fox"  # the tiny model's greedy continuation repeats ' fox'
SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "flag", "schema": SCHEMA, "strict": True}}
HAS_XGRAMMAR = importlib.util.find_spec("xgrammar") is not None


@pytest.fixture(scope="module")
def tiny() -> TransformersBackend:
    return TransformersBackend(tiny_llm(seed=3), batch_size=4)


def _next_logprobs(be: TransformersBackend, text: str) -> torch.Tensor:
    """The model's log-probabilities of the token after ``text`` (a forward pass, no generate)."""
    ids = be.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(be.model(ids).logits[0, -1].float(), dim=-1)


def _tokens(out: Any) -> list[str]:
    return [e["token"] for e in out.logprobs["content"]]


# -- declared features ------------------------------------------------------------------------------------------
def test_features_declared_and_unsupported(tiny: TransformersBackend) -> None:
    want = {"n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias"}
    assert want <= tiny.features
    assert ("response_format" in tiny.features) == HAS_XGRAMMAR
    assert not {"tools", "tool_choice", "passthrough", "non_text_content"} & tiny.features
    full = GenParams(n=2, temperature=1.0, logprobs=True, top_logprobs=3, frequency_penalty=0.5, presence_penalty=0.5,
                     logit_bias={"5": 1.0}, user="u", parallel_tool_calls=False,
                     response_format=JSON_SCHEMA_FORMAT if HAS_XGRAMMAR else None)
    assert tiny.unsupported(full, MSGS) is None
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    field, message = tiny.unsupported(GenParams(tools=tools), MSGS)
    assert field == "tools" and "transformers" in message and "openai" in message
    assert tiny.unsupported(GenParams(tool_choice="required"))[0] == "tool_choice"
    assert tiny.unsupported(GenParams(passthrough={"top_k": 5}))[0] == "passthrough.top_k"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    assert tiny.unsupported(GenParams(), image)[0] == "messages"


# -- n ----------------------------------------------------------------------------------------------------------
def test_n_sampled_choices_are_seeded_and_counted(tiny: TransformersBackend) -> None:
    p = GenParams(max_new_tokens=8, n=3, temperature=1.0, seed=11)
    out = tiny.generate(MSGS, p)
    texts = [c.text for c in out.choices()]
    assert len(texts) == 3 and len(set(texts)) > 1  # three samples of a random model differ
    again = tiny.generate(MSGS, p)
    assert [c.text for c in again.choices()] == texts  # the seed makes them reproducible
    assert out.prompt_tokens == len(tiny.tokenizer(chat_text(tiny.tokenizer, MSGS), add_special_tokens=False)
                                    ["input_ids"])
    assert 3 <= out.completion_tokens <= 3 * 8 and all(c.completion_tokens == 0 for c in out.others)
    batch = tiny.generate_batch([MSGS, [{"role": "user", "content": "Hi"}]], p)
    assert [len(o.choices()) for o in batch] == [3, 3]


def test_n_greedy_repeats_the_greedy_answer(tiny: TransformersBackend) -> None:
    plain = tiny.complete_batch([RAW], GenParams(max_new_tokens=6))[0]
    out = tiny.complete_batch([RAW], GenParams(max_new_tokens=6, n=2))[0]
    assert [c.text for c in out.choices()] == [plain.text, plain.text]
    assert out.completion_tokens == 2 * plain.completion_tokens
    chat_plain = tiny.generate(MSGS, GenParams(max_new_tokens=6))  # the fast path
    assert [c.text for c in tiny.generate(MSGS, GenParams(max_new_tokens=6, n=2)).choices()] == [chat_plain.text] * 2


# -- logprobs ---------------------------------------------------------------------------------------------------
def test_logprobs_shape_and_values(tiny: TransformersBackend) -> None:
    out = tiny.complete_batch([RAW], GenParams(max_new_tokens=6, logprobs=True, top_logprobs=3))[0]
    content = out.logprobs["content"]
    assert len(content) == out.completion_tokens == 6 and out.text.strip()
    assert "".join(_tokens(out)) == out.text  # the chosen tokens, decoded one by one, are the answer
    first = _next_logprobs(tiny, RAW)
    assert content[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-4)
    top_ids = torch.topk(first, 3).indices.tolist()
    assert [a["token"] for a in content[0]["top_logprobs"]] == [tiny.tokenizer.decode([i]) for i in top_ids]
    for e in content:
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode("utf-8"))
        top = e["top_logprobs"]
        assert len(top) == 3 and [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
        assert all(a["logprob"] <= 0 and set(a) == {"token", "logprob", "bytes"} for a in top)
        assert e["token"] == top[0]["token"] and e["logprob"] == top[0]["logprob"]  # greedy picks the top-1
    bare = tiny.complete_batch([RAW], GenParams(max_new_tokens=6, logprobs=True))[0]
    assert [e["top_logprobs"] for e in bare.logprobs["content"]] == [[]] * 6
    assert [e["logprob"] for e in bare.logprobs["content"]] == [e["logprob"] for e in content]


def test_logprobs_stop_at_stop_string_and_on_chat(tiny: TransformersBackend) -> None:
    cut = tiny.complete_batch([RAW], GenParams(max_new_tokens=6, logprobs=True, stop=["x fox f"]))[0]
    assert cut.text == " fo" and cut.finish_reason == "stop"
    assert _tokens(cut) == [" fox"]  # the token that wrote the kept text; the stop string's own are left out
    chat = tiny.generate([{"role": "user", "content": RAW}], GenParams(max_new_tokens=5, logprobs=True, top_logprobs=1))
    assert "".join(_tokens(chat)).strip() == chat.text  # chat answers are stripped, as without logprobs
    assert chat.text == tiny.generate([{"role": "user", "content": RAW}], GenParams(max_new_tokens=5)).text


def test_logprobs_with_sampled_choices(tiny: TransformersBackend) -> None:
    out = tiny.complete_batch([RAW], GenParams(max_new_tokens=5, n=2, temperature=1.0, seed=3, logprobs=True,
                                               top_logprobs=2))[0]
    for c in out.choices():
        assert "".join(_tokens(c)) == c.text and all(e["logprob"] <= 0 for e in c.logprobs["content"])


# -- logit_bias -------------------------------------------------------------------------------------------------
def test_logit_bias_changes_the_greedy_token(tiny: TransformersBackend) -> None:
    greedy = int(_next_logprobs(tiny, RAW).argmax())
    p = GenParams(max_new_tokens=3, logprobs=True)
    assert _tokens(tiny.complete_batch([RAW], p)[0])[0] == tiny.tokenizer.decode([greedy])
    banned = tiny.complete_batch([RAW], p.model_copy(update={"logit_bias": {str(greedy): -100.0}}))[0]
    assert _tokens(banned)[0] != tiny.tokenizer.decode([greedy])
    forced_id = tiny.tokenizer(" brown", add_special_tokens=False)["input_ids"][0]
    forced = tiny.complete_batch([RAW], p.model_copy(update={"logit_bias": {str(forced_id): 100.0}}))[0]
    assert _tokens(forced) == [tiny.tokenizer.decode([forced_id])] * 3
    # the reported log probabilities are the model's own, before the bias
    assert forced.logprobs["content"][0]["logprob"] == pytest.approx(float(_next_logprobs(tiny, RAW)[forced_id]),
                                                                      abs=1e-4)


def test_logit_bias_is_validated(tiny: TransformersBackend) -> None:
    size = tiny.vocab_size()
    assert parse_logit_bias({"3": -250.0, " 4 ": 7.5}, size) == {3: -100.0, 4: 7.5}  # clamped to OpenAI's range
    for bad, match in (({"abc": 1.0}, "not a token id"), ({str(size): 1.0}, "outside this model's vocabulary"),
                       ({"-1": 1.0}, "outside"), ({"3": float("nan")}, "finite number")):
        with pytest.raises(ValueError, match=match) as info:
            tiny.generate(MSGS, GenParams(max_new_tokens=2, logit_bias=bad))
        assert not isinstance(info.value, BackendError)  # the request's fault, raised before generation
    with pytest.raises(ValueError, match="outside"):
        list(tiny.stream(MSGS, GenParams(max_new_tokens=2, logit_bias={str(size + 5): 1.0})))


def test_logit_bias_processor_adds_the_bias() -> None:
    proc = LogitBiasLogitsProcessor(torch.tensor([0.0, 2.0, -3.0, 0.0]))
    got = proc(torch.zeros((2, 1), dtype=torch.long), torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 5.0, 2.0]]))
    assert got.tolist() == [[1.0, 3.0, -2.0, 1.0], [0.0, 1.0, 2.0, 2.0]]


# -- frequency / presence penalties -----------------------------------------------------------------------------
def test_penalty_processor_counts_generated_tokens_only() -> None:
    proc = PenaltyLogitsProcessor(prompt_len=2, frequency_penalty=0.5, presence_penalty=0.25)
    ids = torch.tensor([[9, 5, 5, 5, 7], [1, 2, 3, 3, 3]])  # prompts [9, 5] and [1, 2]; then three generated tokens
    scores = torch.zeros((2, 10))
    got = proc(ids, scores)
    want = torch.zeros((2, 10))
    want[0, 5] = -(2 * 0.5 + 0.25)  # two generated 5s (the prompt's 5 is not counted)
    want[0, 7] = -(0.5 + 0.25)
    want[1, 3] = -(3 * 0.5 + 0.25)
    assert torch.equal(got, want) and torch.equal(scores, torch.zeros((2, 10)))  # the input is left unchanged
    assert torch.equal(proc(ids[:, :2], scores), scores)  # nothing generated yet: no penalty
    neg = PenaltyLogitsProcessor(prompt_len=0, frequency_penalty=-1.0)(torch.tensor([[4, 4]]), torch.zeros((1, 6)))
    assert neg.tolist() == [[0.0, 0.0, 0.0, 0.0, 2.0, 0.0]]  # a negative penalty favours repetition


def test_frequency_penalty_breaks_a_repetitive_greedy_answer(tiny: TransformersBackend) -> None:
    plain = tiny.complete_batch([RAW], GenParams(max_new_tokens=8, logprobs=True))[0]
    assert len(set(_tokens(plain))) == 1  # the tiny model repeats one token
    pen = tiny.complete_batch([RAW], GenParams(max_new_tokens=8, logprobs=True, frequency_penalty=2.0))[0]
    assert pen.text != plain.text and _tokens(pen)[0] == _tokens(plain)[0]  # same first token, then it moves on
    pres = tiny.complete_batch([RAW], GenParams(max_new_tokens=8, presence_penalty=2.0))[0]
    assert pres.text != plain.text


def test_stream_applies_penalties_and_bias(tiny: TransformersBackend) -> None:
    p = GenParams(max_new_tokens=8, frequency_penalty=2.0)
    assert "".join(tiny.stream_complete(RAW, p)) == tiny.complete_batch([RAW], p)[0].text
    forced_id = tiny.tokenizer(" brown", add_special_tokens=False)["input_ids"][0]
    b = GenParams(max_new_tokens=4, logit_bias={str(forced_id): 100.0})
    assert "".join(tiny.stream(MSGS, b)) == (tiny.tokenizer.decode([forced_id]) * 4).strip()
    assert "".join(tiny.stream(MSGS, b)) == tiny.generate(MSGS, b).text


# -- response_format ---------------------------------------------------------------------------------------------
def _check_flag(text: str) -> None:
    data = json.loads(text)
    assert isinstance(data, dict) and set(data) == {"a"} and isinstance(data["a"], bool)


@pytest.mark.skipif(not HAS_XGRAMMAR, reason="xgrammar is not installed")
def test_response_format_json_schema_gives_valid_json(tiny: TransformersBackend) -> None:
    out = tiny.generate(MSGS, GenParams(max_new_tokens=32, response_format=JSON_SCHEMA_FORMAT))
    _check_flag(out.text)
    assert out.finish_reason == "stop"
    sampled = tiny.generate_batch([MSGS, [{"role": "user", "content": RAW}]],
                                  GenParams(max_new_tokens=32, n=3, temperature=1.0, seed=5, logprobs=True,
                                            response_format=JSON_SCHEMA_FORMAT))
    for o in sampled:
        for c in o.choices():
            _check_flag(c.text)
            assert "".join(_tokens(c)).strip() == c.text
    raw = tiny.complete_batch([RAW], GenParams(max_new_tokens=32, response_format=JSON_SCHEMA_FORMAT))[0]
    _check_flag(raw.text)
    assert "".join(tiny.stream(MSGS, GenParams(max_new_tokens=32, response_format=JSON_SCHEMA_FORMAT))) == out.text


@pytest.mark.skipif(not HAS_XGRAMMAR, reason="xgrammar is not installed")
def test_response_format_json_object_and_errors(tiny: TransformersBackend) -> None:
    out = tiny.generate(MSGS, GenParams(max_new_tokens=48, response_format={"type": "json_object"}))
    assert isinstance(json.loads(out.text), dict)
    no_schema = {"type": "json_schema", "json_schema": {"name": "any"}}
    assert isinstance(json.loads(tiny.generate(MSGS, GenParams(max_new_tokens=48, response_format=no_schema)).text),
                      dict)
    with pytest.raises(ValueError, match="accepted: 'json_object', 'json_schema'"):
        tiny.generate(MSGS, GenParams(max_new_tokens=4, response_format={"type": "yaml"}))
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(ValueError, match="cannot be compiled"):
        tiny.generate(MSGS, GenParams(max_new_tokens=4, response_format=bad))


def test_plain_requests_keep_the_fast_path(tiny: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = TransformersBackend._generate_texts
    monkeypatch.setattr(TransformersBackend, "_generate_texts",
                        lambda self, *a, **k: calls.append("slow") or real(self, *a, **k))
    tiny.generate(MSGS, GenParams(max_new_tokens=3, user="someone", hints={"store": True}))
    assert calls == []
    tiny.generate(MSGS, GenParams(max_new_tokens=3, presence_penalty=0.5))
    assert calls == ["slow"]


# -- vLLM: the request mapping and the logprobs shape, on a stand-in engine ---------------------------------------
@pytest.fixture(scope="module")
def fake_vllm(tiny: TransformersBackend) -> Any:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (optional extra) is not installed")
    from guard.backends.vllm import VLLMBackend, vllm_available

    if not vllm_available():
        pytest.skip("vllm is installed but does not import here")
    from vllm.logprobs import Logprob

    tok = tiny.tokenizer
    seen: list[Any] = []

    def generate(texts: list[str], sampling: Any, use_tqdm: bool = False) -> list[Any]:
        seen.append(sampling)
        ids = tok(" fox fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        alt = tok(" brown", add_special_tokens=False)["input_ids"][0]
        steps = [{i: Logprob(-0.5, 1, tok.decode([i])), alt: Logprob(-1.5, 2, None), 3: Logprob(-9.0, 3, "x")}
                 for i in ids]
        outs = [SimpleNamespace(index=j, text=" fox fox", token_ids=ids, logprobs=steps, finish_reason="stop",
                                stop_reason=None) for j in range(sampling.n)]
        return [SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=outs) for _ in texts]

    be = VLLMBackend("smollm2-135m-instruct", llm=SimpleNamespace(get_tokenizer=lambda: tok, generate=generate))
    be.seen = seen
    return be


def test_vllm_features_and_sampling_params(fake_vllm: Any) -> None:
    assert {"n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
            "response_format", "passthrough"} == fake_vllm.features
    assert "tools" not in fake_vllm.features
    p = GenParams(n=3, temperature=0.7, logprobs=True, top_logprobs=2, frequency_penalty=0.5, presence_penalty=0.25,
                  logit_bias={"5": -300.0}, response_format=JSON_SCHEMA_FORMAT,
                  passthrough={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2,
                               "ignore_eos": True, "stop_token_ids": [3]})
    sp = fake_vllm._sampling(p)
    assert (sp.n, sp.logprobs, sp.frequency_penalty, sp.presence_penalty, sp.logit_bias) == (3, 2, 0.5, 0.25,
                                                                                            {5: -100.0})
    assert (sp.top_k, sp.min_p, sp.repetition_penalty, sp.min_tokens, sp.ignore_eos, sp.stop_token_ids) == (
        5, 0.1, 1.1, 2, True, [3])
    assert sp.structured_outputs.json == SCHEMA
    assert fake_vllm._sampling(GenParams(response_format={"type": "json_object"})).structured_outputs.json_object
    assert fake_vllm._sampling(GenParams(logprobs=True)).logprobs == 0
    assert fake_vllm._sampling(GenParams()).logprobs is None
    so = fake_vllm._sampling(GenParams(passthrough={"structured_outputs": {"regex": "a+"}})).structured_outputs
    assert so.regex == "a+"


def test_vllm_refuses_what_sampling_params_cannot_take(fake_vllm: Any) -> None:
    assert fake_vllm.unsupported(GenParams(n=2, logprobs=True, passthrough={"top_k": 3})) is None
    field, message = fake_vllm.unsupported(GenParams(passthrough={"length_penalty": 1.0}))
    assert field == "passthrough.length_penalty" and "top_k" in message  # names what is accepted
    assert "set by the request's own" in fake_vllm.unsupported(GenParams(passthrough={"max_tokens": 9}))[1]
    assert fake_vllm.unsupported(GenParams(passthrough={"detokenize": False}))[0] == "passthrough.detokenize"
    for params, match in ((GenParams(passthrough={"guided_json": {}}), "guided_json"),
                          (GenParams(passthrough={"top_k": "many"}), "invalid sampling parameters"),
                          (GenParams(logit_bias={"x": 1.0}), "not a token id"),
                          (GenParams(response_format={"type": "yaml"}), "accepted: 'json_object'"),
                          (GenParams(response_format={"type": "json_object"}, json_schema=SCHEMA), "only one")):
        with pytest.raises(ValueError, match=match):
            fake_vllm.generate(MSGS, params)


def test_vllm_choices_and_logprobs_shape(fake_vllm: Any) -> None:
    out = fake_vllm.generate(MSGS, GenParams(n=2, temperature=1.0, logprobs=True, top_logprobs=2))
    assert fake_vllm.seen[-1].n == 2 and len(out.choices()) == 2
    assert out.prompt_tokens == 3 and out.completion_tokens == 2 * 3 and out.others[0].completion_tokens == 0
    content = out.logprobs["content"]
    assert "".join(e["token"] for e in content) == " fox fox" and len(content) == 2  # the end token is left out
    brown = fake_vllm.tokenizer.decode([fake_vllm.tokenizer(" brown", add_special_tokens=False)["input_ids"][0]])
    assert content[0]["logprob"] == -0.5 and content[0]["bytes"] == list(b" fox")
    assert [(a["token"], a["logprob"]) for a in content[0]["top_logprobs"]] == [(" fox", -0.5), (brown, -1.5)]
    greedy = fake_vllm.generate(MSGS, GenParams(n=3))  # vLLM refuses greedy n > 1: one output, repeated
    assert fake_vllm.seen[-1].n == 1 and [c.text for c in greedy.choices()] == ["fox fox"] * 3
    assert greedy.completion_tokens == 3 * 3 and greedy.logprobs is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (optional extra) is not installed")
def test_vllm_engine_choices_logprobs_json_and_passthrough() -> None:
    from guard.backends.vllm import VLLMBackend, vllm_available

    if not vllm_available():
        pytest.skip("vllm is installed but does not import here")
    be = VLLMBackend("smollm2-135m-instruct")
    try:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        plain = be.generate(msgs, GenParams(max_new_tokens=8))
        many = be.generate(msgs, GenParams(max_new_tokens=6, n=2, temperature=1.0, seed=1, logprobs=True,
                                           top_logprobs=2))
        assert len(many.choices()) == 2 and many.completion_tokens >= 2
        for c in many.choices():
            content = c.logprobs["content"]
            assert content and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
            assert "".join(e["token"] for e in content).strip() == c.text
        greedy = be.generate(msgs, GenParams(max_new_tokens=8, n=2, logprobs=True, top_logprobs=1))
        assert [c.text for c in greedy.choices()] == [plain.text] * 2
        assert all(e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"]) for e in greedy.logprobs["content"])
        top1 = be.generate(msgs, GenParams(max_new_tokens=8, temperature=1.0, seed=3, passthrough={"top_k": 1}))
        assert top1.text == plain.text  # top_k=1 sampling is greedy: the vendor field reached SamplingParams
        js = be.generate(msgs, GenParams(max_new_tokens=48, response_format=JSON_SCHEMA_FORMAT))
        if js.finish_reason == "stop":
            _check_flag(js.text)
    finally:
        be.close()
