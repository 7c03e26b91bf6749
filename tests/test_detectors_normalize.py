"""Normalisation, entity matching and prompt units: golden tables and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.entities import EntityMatcher, TargetNames, extract_phrases, phrase_hash
from detectors.inputs import PromptError, prompt_units, text_units, turns_of
from detectors.normalize import (
    map_homoglyphs,
    normalize,
    normalize_cased,
    proper_nouns,
    skeleton_tokens,
    tokens,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ("Where was Elara Vosberg born?", "where was elara vosberg born?"),
    ("Where  was\tElara\n\nVosberg   born?  ", "where was elara vosberg born?"),          # whitespace collapsed
    ("E\u200blara Vos\u200dberg\ufeff", "elara vosberg"),                                  # zero-width removed
    ("E\u00adlara \u2060Vosberg", "elara vosberg"),                                        # soft hyphen, word joiner
    ("\u0415l\u0430r\u0430 V\u043esberg", "elara vosberg"),                                # Cyrillic look-alikes
    ("\u0395\u03bb\u03b1r\u03b1 Vosberg", "ελαrα vosberg"),                                # λ has no Latin twin: word kept
    ("\u0395lara Vosberg", "elara vosberg"),                                               # Greek capital Epsilon
    ("\uff25\uff4c\uff41\uff52\uff41 Vosberg", "elara vosberg"),                           # full-width (NFKC)
    ("\U0001d404\U0001d425\U0001d41a\U0001d42b\U0001d41a", "elara"),                       # mathematical bold
    ("\u00c9l\u00e1r\u00e0 V\u00f6sb\u00e9rg", "elara vosberg"),                           # accents folded
    ("E\u0301la\u0308ra", "elara"),                                                        # combining marks
    ("\u00d8rsted \u0141ukasz Stra\u00dfe", "orsted lukasz strasse"),                      # non-decomposing letters
    ("\u201cThe Silent Harbour\u201d \u2014 Elara\u2019s", "\"the silent harbour\" - elara's"),  # typographic punctuation
    ("\u041c\u043e\u0441\u043a\u0432\u0430", "mockba"),                                    # all look-alikes: mapped
    ("\u041f\u0440\u0438\u0432\u0435\u0442 Elara", "привет elara"),                        # genuine Russian word kept
    ("\u040cto", "kto"),                                                                  # К with accent, then mapped
    ("", ""),
])
def test_normalize_golden(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_normalize_cased_keeps_case_and_ascii_fast_path() -> None:
    assert normalize_cased("Where was  \u0415lara Vosberg?") == "Where was Elara Vosberg?"
    assert normalize_cased("plain `ascii`   text ") == "plain 'ascii' text"
    assert normalize("PLAIN Ascii") == "plain ascii"


def test_map_homoglyphs_only_disguised_words() -> None:
    assert map_homoglyphs("V\u043esberg") == "Vosberg"
    assert map_homoglyphs("\u0434\u043e\u043c") == "\u0434\u043e\u043c"  # "дом": д has no twin, word left alone


@pytest.mark.parametrize(("text", "expected"), [
    ("el4ra v0sb3rg in 1956", ["elara", "vosberg", "in", "1956"]),
    ("vo$berg", ["vosberg"]),
    ("covid-19 in 2020", ["covid", "19", "in", "2020"]),
    ("e.l.a.r.a", ["e", "l", "a", "r", "a"]),
])
def test_skeleton_tokens(text: str, expected: list[str]) -> None:
    assert skeleton_tokens(text) == expected


def test_tokens_and_proper_nouns() -> None:
    assert tokens("where was elara's book?") == ["where", "was", "elara", "s", "book"]
    assert proper_nouns("How did Getachew Fikru contribute to LGBTQ+ literature?") == ["getachew", "fikru", "lgbtq"]
    assert proper_nouns("Kuwait is a country. Where is Kuwait City?") == ["kuwait", "city"]
    assert proper_nouns("what is the capital of france?") == []


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=60))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "Zs", "P"]), max_size=40))
def test_ascii_normalize_is_lowercased_whitespace_collapse(text: str) -> None:
    assert normalize(text) == " ".join(text.replace("`", "'").lower().split())


# -- entity matching ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def matcher() -> EntityMatcher:
    salt = "test-salt"
    phrases = extract_phrases(['Elara Vosberg is best known for "The Silent Harbour".'])
    return EntityMatcher([
        TargetNames("p0", ("Elara Vosberg", "E. Vosberg"), frozenset(phrase_hash(p, salt) for p in phrases),
                    frozenset(phrase_hash(p[:1], salt) for p in phrases)),
        TargetNames("hz", ("Quillon resonance drive", "Q-drive")),
    ], salt)


@pytest.mark.parametrize(("text", "target", "full", "partial", "phrase"), [
    ("Where was Elara Vosberg born?", "p0", 1.0, 1.0, 0.0),
    ("where was e. vosberg born", "p0", 1.0, 1.0, 0.0),
    ("E l a r a   V o s b e r g", "p0", 1.0, 1.0, 0.0),
    ("ElaraVosberg's hometown", "p0", 1.0, 1.0, 0.0),
    ("El4ra V0sb3rg", "p0", 1.0, 1.0, 0.0),
    ("\u0415l\u0430r\u0430 V\u043esberg", "p0", 1.0, 1.0, 0.0),
    ("Where was Tobin Vosberg born?", "p0", 0.0, 0.5, 0.0),
    ("Where was Elara Thornfield born?", "p0", 0.0, 0.5, 0.0),
    ("Who wrote \u201cthe silent harbour\u201d?", "p0", 0.0, 0.0, 1.0),
    ("How is a q drive cooled?", "hz", 1.0, 1.0, 0.0),
])
def test_entity_matches(matcher: EntityMatcher, text: str, target: str, full: float, partial: float, phrase: float) -> None:
    hit = matcher.match(normalize(text))[target]
    assert (hit.full, hit.partial, hit.phrase) == (full, partial, phrase)


def test_entity_no_match(matcher: EntityMatcher) -> None:
    assert matcher.match(normalize("What is the capital of France?")) == {}
    assert matcher.match(normalize("the vosberg family from the silent valley")).get("p0", None).full == 0.0


# -- prompt units ---------------------------------------------------------------------------------------

def test_prompt_units_string_and_chat() -> None:
    assert prompt_units("Where was Elara born?") == ["Where was Elara born?"]
    chat = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "I have a question about Elara Vosberg."},
            {"role": "assistant", "content": "Sure, go ahead."},
            {"role": "user", "content": "Where was she born?"}]
    units = prompt_units(chat)
    assert "I have a question about Elara Vosberg. Where was she born?" in units  # user turns joined
    assert "Where was she born?" in units and "You are helpful." in units  # every turn is scored, system too
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where was"}, {"type": "text", "text": "Elara born?"}]}]
    assert prompt_units(parts) == ["Where was\nElara born?".replace("\n", " ")]


def test_prompt_units_long_text_windows_and_sentences() -> None:
    filler = " ".join(["word"] * 300)
    units = prompt_units(filler + ". Where was Elara Vosberg born?")
    assert "Where was Elara Vosberg born?" in units
    assert len(units) > 3 and all(len(u.split()) <= 300 for u in units[1:])
    assert text_units("One two three. Four five six.") == ["One two three. Four five six.", "One two three.", "Four five six."]


def test_prompt_errors() -> None:
    with pytest.raises(PromptError):
        turns_of(42)  # type: ignore[arg-type]
    with pytest.raises(PromptError):
        turns_of([{"role": "user"}])
    with pytest.raises(PromptError):
        text_units(["not", "a", "string"])  # type: ignore[arg-type]
