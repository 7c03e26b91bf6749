"""LangChain Runnable: str -> str, messages -> AIMessage, composition with |, config forwarding, streaming."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from core.schema import ForgetTarget
from detectors.oracle import OracleDetector
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.langchain import GuardRunnable

T = ForgetTarget(id="p", kind="privacy", names=["Elara Voswick"], policy="Do not reveal facts about Elara Voswick.")
REFUSE = json.dumps({"requires_refusal": True, "cot_instruction": "Decline: personal details."})


def runnable() -> tuple[GuardRunnable, ScriptedBackend]:
    target = ScriptedBackend(lambda m: "echo: " + m[-1]["content"])
    g = GuardedLLM(target, OracleDetector([T]), guard=ScriptedBackend(lambda m: REFUSE, json_schema=True))
    return GuardRunnable(g, max_new_tokens=16), target


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []
        self.ends = 0

    def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        self.starts.append(kw)

    def on_chain_end(self, outputs: Any, **kw: Any) -> None:
        self.ends += 1


def test_str_and_messages() -> None:
    r, target = runnable()
    assert r.invoke("hello") == "echo: hello"
    msg = r.invoke([SystemMessage("Be brief."), HumanMessage("hi")])
    assert isinstance(msg, AIMessage) and msg.content == "echo: hi"
    assert msg.response_metadata["guard"]["flagged"] is False
    assert target.calls[-1][0][0] == {"role": "system", "content": "Be brief."}
    refused = r.invoke([HumanMessage("Where was Elara Voswick born?")])
    assert refused.response_metadata["finish_reason"] == "content_filter"
    assert target.calls[-1][1].max_new_tokens == 16


def test_composition_and_config_forwarding() -> None:
    r, _ = runnable()
    chain = ChatPromptTemplate.from_messages([("system", "Answer in one line."), ("human", "{q}")]) | r | StrOutputParser()
    rec = Recorder()
    out = chain.invoke({"q": "What is 2+2?"}, config={"callbacks": [rec], "tags": ["guarded"], "run_name": "demo"})
    assert out == "echo: What is 2+2?"
    assert rec.ends >= 2 and any("guarded" in (s.get("tags") or []) for s in rec.starts)
    upper = r | RunnableLambda(lambda s: s.upper())
    assert upper.invoke("abc") == "ECHO: ABC"


def test_batch_stream_and_async() -> None:
    r, _ = runnable()
    assert r.batch(["a", "Where was Elara Voswick born?"])[0] == "echo: a"
    assert r.batch(["a", "Where was Elara Voswick born?"])[1].startswith("I'm sorry")
    assert "".join(r.stream("one two three")) == "echo: one two three"
    chunks = list(r.stream([HumanMessage("x y")]))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.content for c in chunks) == "echo: x y"
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | r | StrOutputParser()
    assert "".join(chain.stream({"q": "p q"})) == "echo: p q"


async def test_async_variants() -> None:
    r, _ = runnable()
    assert await r.ainvoke("hi") == "echo: hi"
    assert "".join([x async for x in r.astream("a b")]) == "echo: a b"
    assert await r.abatch(["a", "b"]) == ["echo: a", "echo: b"]
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | r | StrOutputParser()
    assert "".join([c async for c in chain.astream({"q": "z"})]) == "echo: z"
