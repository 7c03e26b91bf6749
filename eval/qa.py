"""Generation-based QA evaluation: answer questions greedily, score them against references."""

from __future__ import annotations

from collections.abc import Sequence

from core.generation import generate
from core.models import LoadedLLM
from core.schema import QAItem
from eval.metrics.rouge import MetricResult, rouge_l_recall


def answer_rouge(llm: LoadedLLM, items: Sequence[QAItem], max_new_tokens: int = 48, batch_size: int = 32,
                 paraphrased: bool = False) -> MetricResult:
    """Greedy answers to QA items scored by ROUGE-L recall (TOFU's generation metric)."""
    questions = [(q.paraphrased_question or q.question) if paraphrased else q.question for q in items]
    answers = generate(llm.model, llm.tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=True, desc="answer")
    return rouge_l_recall(answers, [q.answer for q in items])
