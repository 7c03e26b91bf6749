"""General knowledge: the shipped evaluation and replay sets, their disjointness, and answer checking.

Disjointness (``_clash``) compares two questions after normalisation (accents stripped, lowercase,
punctuation removed, whitespace collapsed) and flags them when

1. the normalised texts are equal;
2. their *content words* are the same set, or one set (of at least two words) contains the other.
   Content words are the lowercased words minus a small stopword list, lightly lemmatised (plural
   and possessive endings dropped) and with relation synonyms merged (wrote/author/penned -> write,
   tallest/highest -> highest, ...), so "Who is the author of X?" and "Who wrote X?" meet;
3. they share a named entity and a relation: entities are runs of capitalised words (plus quoted
   titles, with a few synonyms: "Second World War" = "World War II", "UK" = "United Kingdom"); two
   entities match when one's words contain the other's ("Everest" ~ "Mount Everest"). Sharing an
   entity clashes when the questions also share a non-entity content word (the relation: "capital",
   "write", ...) or when either has no relation word at all ("Tell me about X" vs "What is X?").
   Generic words (city, country, famous, known, name, year, ...) do not count as relations.

Between the evaluation set and the replay prompts the check is stricter: any shared named entity
clashes, so the replayed answers never touch an evaluated fact.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest

from core.schema import SchemaError
from detectors.benign import builtin_benign_questions
from eval.general import (
    GeneralItem,
    GeneralScore,
    answer_correct,
    builtin_general_knowledge,
    general_accuracy,
    general_knowledge_items,
    general_training_qa,
    normalize_answer,
    read_general_jsonl,
    replay_prompts,
    tofu_general_knowledge,
)
from eval.tasks.offline import _BENIGN

TOFU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tofu"
TOPICS = {"geography", "science", "literature", "history", "arts", "everyday"}

# ---------------------------------------------------------------------------------------------
# The content-word / entity check
# ---------------------------------------------------------------------------------------------

_STOP = set("""
a an the of in on at to for from by with and or nor but is are was were be been being am do does did doing
what which who whom whose where when why how that this these those it its i me my mine you your yours we our
us he him his she her they them their as into onto about than then there here has have had having can could
would should will shall may might must some any each every all most more much many very so such not no yes
if also just only out up down over under again once own same other another s t
""".split())
# Words too generic to name the relation a question asks about.
_GENERIC = set("""
city country world year known famous name named called located find situated one often usually typically
please tell me give some good best briefly short simple way new great north south east west united
""".split())
# Sentence-initial verbs of instructions: never the start of a named entity.
_IMPERATIVE = set("""
write give explain suggest recommend tell list describe summarise summarize plan draft name convert translate
compose create make help share outline compare brainstorm rewrite proofread define offer propose
""".split())
_CONNECT = {"of", "the", "and", "de", "da", "van", "von", "del", "la", "le", "du"}
_SYNONYMS = {
    "wrote": "write", "written": "write", "writes": "write", "writer": "write", "author": "write",
    "authored": "write", "penned": "write", "pen": "write", "novelist": "write",
    "painted": "paint", "painter": "paint", "painting": "paint",
    "composed": "compose", "composer": "compose", "sang": "sing", "singer": "sing", "sung": "sing",
    "invented": "invent", "inventor": "invent", "invention": "invent",
    "discovered": "discover", "discoverer": "discover", "discovery": "discover",
    "biggest": "largest", "tallest": "highest", "began": "start", "begin": "start", "started": "start",
    "beginning": "start", "ended": "end", "ending": "end", "died": "die", "death": "die", "born": "birth",
    "directed": "direct", "director": "direct", "sculpted": "sculpt", "sculptor": "sculpt",
    "mean": "meaning", "means": "meaning", "definition": "meaning", "define": "meaning", "earth": "world",
}
_NO_PLURAL = {"series", "species", "news", "physics", "mathematics", "always", "perhaps", "whereas", "was", "has",
              "does", "is", "this", "its", "gas", "bus", "plus", "famous", "various", "previous", "serious"}
_ENTITY_SYNONYMS = {
    "second world war": "world war ii", "ww2": "world war ii", "wwii": "world war ii",
    "first world war": "world war i", "ww1": "world war i", "wwi": "world war i",
    "uk": "united kingdom", "britain": "united kingdom", "great britain": "united kingdom",
    "us": "united states", "usa": "united states", "u s": "united states", "u s a": "united states",
    "united states of america": "united states",
}
_QUOTED = re.compile(r"(?<![\w])['\"‘“](.+?)['\"’”](?![\w])")
_TOKEN = re.compile(r"[^\W_]+(?:['’.][^\W_]+)*\.?")


def _fold(text: str) -> str:
    """Accent-free, lowercase, punctuation-free, single-spaced text."""
    return normalize_answer(text)


def _lemma(word: str) -> str:
    """A crude lemma: possessive and plural endings dropped, relation synonyms merged."""
    w = word.lower().strip(".")
    w = re.sub(r"['’]s$", "", w).replace("'", "").replace("’", "")
    w = _fold(w).replace(" ", "")
    if w in _SYNONYMS:
        return _SYNONYMS[w]
    if w in _NO_PLURAL:
        return w
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith(("ches", "shes", "sses", "xes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    return _SYNONYMS.get(w, w)


@functools.cache
def _content(text: str) -> frozenset[str]:
    """Content words of a question: folded words minus stopwords, lemmatised."""
    words = [_lemma(w) for w in _fold(text).split() if len(w) > 1 or w.isdigit()]
    return frozenset(w for w in words if w and w not in _STOP)


def _canon_entity(words: list[str]) -> str:
    """An entity's folded words, leading "the" dropped, with synonyms merged."""
    e = re.sub(r"^the ", "", _fold(" ".join(words)))
    for key in sorted(_ENTITY_SYNONYMS, key=len, reverse=True):
        e = re.sub(rf"\b{key}\b", _ENTITY_SYNONYMS[key], e)
    return e


@functools.cache
def _entities(text: str) -> frozenset[str]:
    """Named entities: quoted titles and runs of capitalised words (a sentence-initial word only when followed by one)."""
    found = {_canon_entity([m]) for m in _QUOTED.findall(text)}
    rest = _QUOTED.sub(" , ", text)
    matches = list(_TOKEN.finditer(rest))
    tokens = [re.sub(r"['’]s$", "", m.group()) for m in matches]
    # A punctuation mark between two words ends a run: "Stockholm, Sweden" is two entities.
    breaks = {i for i in range(1, len(matches)) if rest[matches[i - 1].end():matches[i].start()].strip()
              or (tokens[i - 1].endswith(".") and len(tokens[i - 1]) > 3 and "." not in tokens[i - 1][:-1])}
    run: list[str] = []

    def flush() -> None:
        while run and run[-1].lower() in _CONNECT:
            run.pop()
        if run and run != ["I"]:
            e = _canon_entity(run)
            if e and e not in _GENERIC:
                found.add(e)
        run.clear()

    for i, tok in enumerate(tokens):
        if i in breaks:
            flush()
        low = tok.lower().rstrip(".")
        j = i + 1
        while j < len(tokens) and tokens[j].lower() in _CONNECT and j not in breaks:
            j += 1  # "Land of the Rising Sun": connectors bridge to the next capitalised word
        nxt_cap = j < len(tokens) and j not in breaks and tokens[j][:1].isupper()
        if tok[:1].isupper():
            if not run and (low in _STOP or (i == 0 and (low in _IMPERATIVE or not nxt_cap))):
                continue
            run.append(tok)
        elif run and (tok[:1].isdigit() or (low in _CONNECT and nxt_cap)):
            run.append(tok)
        else:
            flush()
    flush()
    return frozenset(found)


def _entity_words(entities: frozenset[str]) -> set[str]:
    """Lemmatised words of a set of entities."""
    return {_lemma(w) for e in entities for w in e.split()} - _STOP


def _entities_match(a: str, b: str) -> bool:
    """Two entities name the same thing when one's words contain the other's and are at least half of them."""
    wa, wb = set(a.split()) - _CONNECT, set(b.split()) - _CONNECT
    small, big = (wa, wb) if len(wa) <= len(wb) else (wb, wa)
    return bool(small) and small <= big and 2 * len(small) >= len(big)


def _clash(a: str, b: str, any_entity: bool = False) -> str | None:
    """Why questions ``a`` and ``b`` ask the same thing (see the module docstring), or None."""
    if _fold(a) == _fold(b):
        return "same normalised text"
    ca, cb = _content(a), _content(b)
    if ca == cb:
        return f"same content words {sorted(ca)}"
    small, big = (ca, cb) if len(ca) <= len(cb) else (cb, ca)
    if len(small) >= 2 and small <= big:
        return f"content words {sorted(small)} contained in {sorted(big)}"
    ea, eb = _entities(a), _entities(b)
    shared = [(x, y) for x in ea for y in eb if _entities_match(x, y)]
    if not shared:
        return None
    if any_entity:
        return f"shared entity {shared[0]}"
    ra, rb = ca - _entity_words(ea) - _GENERIC, cb - _entity_words(eb) - _GENERIC
    if ra & rb:
        return f"shared entity {shared[0]} and relation {sorted(ra & rb)}"
    if not ra or not rb:
        return f"shared entity {shared[0]} and no other relation"
    return None


def _clashes(xs: list[str], ys: list[str], any_entity: bool = False) -> list[str]:
    """Every clashing pair across two lists, as readable lines."""
    return [f"{x!r} ~ {y!r}: {why}" for x in xs for y in ys if (why := _clash(x, y, any_entity))]


def _tofu_questions() -> list[str]:
    """TOFU's world_facts and real_authors questions (JSON lines)."""
    out = []
    for name in ("world_facts.json", "real_authors.json"):
        for line in (TOFU / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line)["question"])
    return out


def _eval_questions() -> list[str]:
    """Questions of the shipped evaluation set."""
    return [it.question for it in builtin_general_knowledge()]


def _benign() -> list[str]:
    """The detector's built-in benign questions plus the offline benchmark's."""
    return [*builtin_benign_questions(), *_BENIGN]


needs_tofu = pytest.mark.skipif(not (TOFU / "world_facts.json").is_file() or not (TOFU / "real_authors.json").is_file(),
                                reason=f"TOFU data not found under {TOFU}")


def test_checker_flags_the_same_fact_and_passes_different_ones():
    """The approximation catches rephrasings of one fact but not different facts about related things."""
    assert _clash("What is the capital of Canada?", "What is the capital city of Canada?")
    assert _clash("Who wrote 'Pride and Prejudice'?", "Who is the author of Pride and Prejudice?")
    assert _clash("What year did the Second World War end?", "When did World War II end?")
    assert _clash("What is the boiling point of water?", "What is the boiling point of water at sea level?")
    assert _clash("Where is Mount Everest?", "Tell me about Everest.")
    assert _clash("What is the capital of Peru?", "Plan a trip to Peru.", any_entity=True)
    assert not _clash("How many legs does an insect have?", "How many legs does a spider have?")
    assert not _clash("What is the capital of Kenya?", "What language is spoken in Kenya?")
    assert not _clash("Who wrote 'Lord of the Flies'?", "What genre is The Lord of the Rings?")


# ---------------------------------------------------------------------------------------------
# The shipped sets
# ---------------------------------------------------------------------------------------------

def test_evaluation_set_schema_and_counts():
    """120 valid items over the six topics, about 30 on authors of books, each answering itself."""
    items = builtin_general_knowledge()
    assert len(items) == 120
    assert all(isinstance(it, GeneralItem) and it.source == "builtin" and not it.wrong for it in items)
    assert {it.topic for it in items} == TOPICS
    authors = [it for it in items if it.topic == "literature" and re.match(r"(?i)who (wrote|is the author)", it.question)]
    assert 28 <= len(authors) <= 34
    for it in items:
        assert len(it.answer.split()) <= 5, it.answer
        assert all(normalize_answer(a) != normalize_answer(it.answer) for a in it.aliases), it
        assert answer_correct(it.answer, it) and all(answer_correct(a, it) for a in it.aliases), it
        assert it.question.endswith("?"), it.question


def test_evaluation_file_lines_have_exactly_the_documented_fields():
    """Every line has question, answer, aliases and topic, nothing else."""
    path = Path(__file__).resolve().parents[1] / "eval" / "data" / "general_knowledge.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"question", "answer", "aliases", "topic"}


def test_replay_set_counts():
    """200 distinct one-line prompts; the returned list is a copy of the cache."""
    prompts = replay_prompts()
    assert len(prompts) == 200
    assert len({_fold(p) for p in prompts}) == 200
    assert all(p == p.strip() and "\n" not in p and len(p) < 200 for p in prompts)
    prompts.clear()
    assert len(replay_prompts()) == 200


def test_general_training_qa_pairs():
    """121 factual questions, each with a one-sentence reference answer."""
    pairs = general_training_qa()
    assert len(pairs) == 121 and len({_fold(q) for q, _ in pairs}) == 121
    assert all(a.endswith(".") and len(a.split()) <= 16 for _, a in pairs)
    assert dict(pairs)["What is the capital of Hungary?"] == "The capital of Hungary is Budapest."


@needs_tofu
def test_general_training_answers_state_no_evaluated_answer():
    """No training answer names a value an evaluation question expects (no author, country or river in common),
    so training on them cannot raise the score by exposure to the answers."""
    items = builtin_general_knowledge() + tofu_general_knowledge(TOFU)
    values = {normalize_answer(x) for g in items for x in (g.answer, *g.aliases) if len(normalize_answer(x)) >= 4}
    hits = [(q, v) for q, a in general_training_qa() for v in values if f" {v} " in f" {normalize_answer(a)} "]
    assert hits == []


def _training_questions() -> list[str]:
    """Everything fine-tuning sees besides the task: replay prompts and the general training questions."""
    return [*replay_prompts(), *(q for q, _ in general_training_qa())]


def test_sets_are_unique_within_themselves():
    """No two evaluation questions (or two training prompts) share text or content words."""
    for qs in (_eval_questions(), _training_questions()):
        seen: dict[frozenset[str], str] = {}
        for q in qs:
            c = _content(q)
            assert c not in seen, f"{q!r} ~ {seen[c]!r}"
            seen[c] = q


def test_evaluation_and_training_ask_about_different_facts():
    """No training prompt rephrases an evaluation question or even names one of its entities."""
    assert _clashes(_eval_questions(), _training_questions(), any_entity=True) == []


def test_sets_are_disjoint_from_builtin_benign_questions():
    """Neither set repeats the detector's or the offline benchmark's benign questions."""
    benign = _benign()
    assert _clashes(_eval_questions(), benign) == []
    assert _clashes(_training_questions(), benign) == []


@needs_tofu
def test_sets_are_disjoint_from_tofu_questions():
    """Neither set repeats a TOFU world_facts or real_authors question."""
    tofu = _tofu_questions()
    assert len(tofu) == 217
    assert _clashes(_eval_questions(), tofu) == []
    assert _clashes(_training_questions(), tofu) == []


# ---------------------------------------------------------------------------------------------
# Answer checking and scoring
# ---------------------------------------------------------------------------------------------

OTTAWA = GeneralItem(question="What is the capital of Canada?", answer="Ottawa",
                     wrong=["Toronto", "Montreal", "Vancouver"])


@pytest.mark.parametrize("text, ok", [
    ("The capital of Canada is Ottawa.", True),
    ("OTTAWA", True),
    ("ottawa, of course", True),
    ("Ottawa, not Toronto.", True),
    ("Toronto", False),
    ("Ottawa, Toronto or Montreal", False),
    ("It is Ottawas.", False),
    ("", False),
])
def test_answer_correct_containment_and_listed_options(text, ok):
    """Whole-word containment; naming two or more wrong options as well is listing choices."""
    assert answer_correct(text, OTTAWA) is ok


def test_answer_correct_accents_aliases_and_numbers():
    """Accents and case fold away; numbers match only through aliases."""
    sao = GeneralItem(question="What is the largest city in Brazil?", answer="São Paulo")
    assert answer_correct("It is Sao Paulo.", sao)
    assert answer_correct("SÃO PAULO", sao)
    assert not answer_correct("Saopaulo", sao)
    legs = GeneralItem(question="How many legs does an insect have?", answer="six", aliases=["6"])
    assert answer_correct("An insect has 6 legs.", legs) and answer_correct("Six legs.", legs)
    assert not answer_correct("An insect has 8 legs.", legs)
    no_alias = GeneralItem(question="How many legs does an insect have?", answer="six")
    assert not answer_correct("6", no_alias)
    austen = GeneralItem(question="Who wrote 'Emma'?", answer="Jane Austen", aliases=["Austen"])
    assert answer_correct("It was written by Austen.", austen)
    assert not answer_correct("Charlotte Bronte wrote it.", austen)


def test_answer_correct_ignores_wrong_options_that_overlap_the_answer():
    """A wrong option inside the right answer cannot count against it."""
    item = GeneralItem(question="Where is the Great Barrier Reef?", answer="Pacific Ocean",
                       wrong=["Pacific", "Atlantic Ocean", "Indian Ocean"])
    assert answer_correct("In the Pacific Ocean, off Australia.", item)
    assert not answer_correct("Pacific Ocean, Atlantic Ocean or Indian Ocean", item)


def test_general_accuracy_value_per_item_and_empty():
    """Accuracy is the mean of per-item verdicts; NaN with no items; lengths must match."""
    items = builtin_general_knowledge()[:3]
    score = general_accuracy([items[0].answer, "no idea", f"I think {items[2].answer}."], items)
    assert isinstance(score, GeneralScore)
    assert score.per_item == (True, False, True) and score.n == 3
    assert score.value == pytest.approx(2 / 3)
    empty = general_accuracy([], [])
    assert math.isnan(empty.value) and empty.n == 0 and empty.per_item == ()
    with pytest.raises(ValueError, match="pair up"):
        general_accuracy(["x"], items)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def test_read_general_jsonl_errors_name_the_line_and_field(tmp_path):
    """A bad record is reported by line number and field."""
    good = {"question": "What is 2 plus 2?", "answer": "four", "aliases": ["4"], "topic": "everyday"}
    path = tmp_path / "gk.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "topic": "cooking"}) + "\n", encoding="utf-8")
    with pytest.raises(SchemaError, match=r"line 2: field topic"):
        read_general_jsonl(path)
    path.write_text(json.dumps({**good, "colour": "red"}) + "\n", encoding="utf-8")
    with pytest.raises(SchemaError, match=r"line 1: field colour"):
        read_general_jsonl(path)
    path.write_text(json.dumps({**good, "aliases": [""]}) + "\n", encoding="utf-8")
    with pytest.raises(SchemaError, match=r"line 1: field aliases"):
        read_general_jsonl(path)
    path.write_text(json.dumps(good) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(SchemaError, match=r"line 3: invalid JSON"):
        read_general_jsonl(path)
    path.write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert read_general_jsonl(path)[0].aliases == ["4"]


def _write_tofu(folder: Path) -> None:
    """A two-record TOFU folder for loader tests that must not depend on the real data."""
    folder.mkdir(parents=True)
    (folder / "real_authors.json").write_text(json.dumps(
        {"question": "Who wrote 'Emma'?", "option1": "Jane Austen", "option2": "Amy Tan", "option3": "Mark Twain",
         "option4": "Emily Bronte", "answer": "Jane Austen"}) + "\n", encoding="utf-8")
    (folder / "world_facts.json").write_text(json.dumps(
        {"question": "What is the capital of Peru?", "option1": "Lima", "option2": "Cusco", "option3": "Quito",
         "option4": "Bogota", "answer": "Lima"}) + "\n", encoding="utf-8")


def test_tofu_items_and_selection(tmp_path):
    """TOFU records become items with wrong options and surname aliases; absent files fall back to built-in."""
    _write_tofu(tmp_path / "tofu")
    items = tofu_general_knowledge(tmp_path / "tofu")
    assert [it.source for it in items] == ["tofu:real_authors", "tofu:world_facts"]
    assert items[0].aliases == ["Austen"] and items[0].wrong == ["Amy Tan", "Mark Twain", "Emily Bronte"]
    assert items[1].aliases == [] and items[1].wrong == ["Cusco", "Quito", "Bogota"]
    assert general_knowledge_items(tmp_path) == items
    assert tofu_general_knowledge(tmp_path / "nowhere") == []
    assert general_knowledge_items(tmp_path / "nowhere") == builtin_general_knowledge()
    assert general_knowledge_items(None) == builtin_general_knowledge()
    (tmp_path / "tofu" / "world_facts.json").write_text(json.dumps({"question": "Q?", "option1": "a", "option2": "b",
                                                                    "option3": "c", "option4": "d", "answer": "e"}))
    with pytest.raises(SchemaError, match="not one of option1"):
        tofu_general_knowledge(tmp_path / "tofu")


@needs_tofu
def test_tofu_general_knowledge_on_the_real_files():
    """The real files give 100 real_authors and 117 world_facts items, each with three wrong options."""
    items = tofu_general_knowledge(TOFU)
    by_source = {s: [it for it in items if it.source == s] for s in ("tofu:real_authors", "tofu:world_facts")}
    assert len(by_source["tofu:real_authors"]) == 100 and len(by_source["tofu:world_facts"]) == 117
    assert all(len(it.wrong) == 3 and answer_correct(it.answer, it) for it in items)
    first = {it.question: it for it in items}
    assert first["Who wrote 'Pride and Prejudice'?"].aliases == ["Austen"]
    assert first["Which American author is well-known for her novel 'The Joy Luck Club'?"].aliases == []  # "Tan"
    assert first["What is the capital of Australia?"].aliases == []  # not a person
    assert first["Which U.S. President signed the Emancipation Proclamation?"].aliases == ["Lincoln"]
    roberts = next(it for it in items if it.answer.startswith("Nora Roberts"))
    assert answer_correct("She writes as J.D. Robb.", roberts)
    assert general_knowledge_items(TOFU.parent) == items
