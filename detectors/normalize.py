"""Text normalisation applied to every input before any scoring, so trivial obfuscation does not evade.

The pipeline (:func:`normalize`) removes invisible characters, applies Unicode NFKC (full-width,
mathematical and compatibility letters become plain ones), folds accents (NFKD, combining marks
dropped, plus letters such as ``ø`` and ``ł`` that do not decompose), maps Cyrillic/Greek/Armenian/
other look-alike letters to Latin inside words that are made of Latin letters and look-alikes only
(so a genuine Russian or Greek word that contains a letter with no Latin twin is left alone),
maps typographic quotes and dashes to ASCII, case-folds and collapses whitespace.

:func:`tokens` splits normalised text into alphanumeric tokens and, for entity matching only,
:func:`skeleton_tokens` also undoes leetspeak inside tokens that mix letters with digits or symbols
(``V0sb3rg`` -> ``vosberg``); digits on their own (years, dates) are never touched.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Look-alike letters (Unicode TR39 "confusables" restricted to letters that render like a Latin
# letter in common fonts). Upper and lower case are both listed; case folding happens afterwards.
_HOMOGLYPH_PAIRS: dict[str, str] = {
    # Cyrillic
    "А": "A", "а": "a", "В": "B", "в": "b", "Е": "E", "е": "e", "Ё": "E", "ё": "e", "К": "K", "к": "k",
    "М": "M", "м": "m", "Н": "H", "н": "h", "О": "O", "о": "o", "Р": "P", "р": "p", "С": "C", "с": "c",
    "Т": "T", "т": "t", "У": "Y", "у": "y", "Х": "X", "х": "x", "Ѕ": "S", "ѕ": "s", "І": "I", "і": "i",
    "Ї": "I", "ї": "i", "Ј": "J", "ј": "j", "Ԁ": "D", "ԁ": "d", "Һ": "H", "һ": "h", "Ӏ": "I", "ӏ": "l",
    "Ԛ": "Q", "ԛ": "q", "Ԝ": "W", "ԝ": "w", "Ү": "Y", "ү": "y", "Ѵ": "V", "ѵ": "v", "Ԍ": "G", "ԍ": "g",
    "Ь": "b", "Ꮃ": "W", "Ɡ": "G", "ɡ": "g", "Ꙅ": "S", "ꙅ": "s", "Ԓ": "N", "Ѡ": "W", "ѡ": "w",
    "Ғ": "F", "ғ": "f", "Ҝ": "K", "Ӑ": "A", "ӑ": "a", "Ӓ": "A", "ӓ": "a", "Ӧ": "O", "ӧ": "o", "Ҫ": "C",
    "ҫ": "c", "Ҭ": "T", "ҭ": "t", "Ӽ": "X", "ӽ": "x", "Ҳ": "X", "ҳ": "x",
    # Greek
    "Α": "A", "α": "a", "Β": "B", "β": "b", "Ε": "E", "ε": "e", "Ζ": "Z", "Η": "H", "Ι": "I", "ι": "i",
    "Κ": "K", "κ": "k", "Μ": "M", "Ν": "N", "ν": "v", "Ο": "O", "ο": "o", "Ρ": "P", "ρ": "p", "Τ": "T",
    "τ": "t", "Υ": "Y", "υ": "u", "Χ": "X", "χ": "x", "γ": "y", "ω": "w", "ϲ": "c", "Ϲ": "C", "ϳ": "j",
    "Ϳ": "J", "ά": "a", "έ": "e", "ί": "i", "ό": "o", "ύ": "u", "ϊ": "i", "ϋ": "u", "Ά": "A", "Έ": "E",
    "Ί": "I", "Ό": "O", "Ύ": "Y", "ϱ": "p", "ϰ": "k", "ϕ": "o",
    # Armenian
    "օ": "o", "Օ": "O", "ս": "u", "Ս": "U", "հ": "h", "ո": "n", "ց": "g", "զ": "q", "ա": "w", "ɑ": "a",
    "Լ": "L", "Տ": "S", "Ց": "G",
    # Cherokee / Coptic / Latin extensions that render like basic Latin letters
    "Ꭺ": "A", "Ᏼ": "B", "Ꮯ": "C", "Ꭰ": "D", "Ꭼ": "E", "Ꮐ": "G", "Ꮋ": "H", "Ꮖ": "I", "Ꭻ": "J", "Ꮶ": "K",
    "Ꮮ": "L", "Ꮇ": "M", "Ꮲ": "P", "Ꮪ": "S", "Ꭲ": "T", "Ꮩ": "V", "Ꮤ": "W", "Ꮓ": "Z",
    "ⲟ": "o", "Ⲟ": "O", "ⲣ": "p", "Ⲣ": "P", "ⲥ": "c", "Ⲥ": "C", "ⲭ": "x", "Ⲭ": "X",
    "ı": "i", "ȷ": "j", "ɩ": "i", "ʀ": "r", "ʏ": "y", "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e",
    "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p",
    "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ǀ": "l", "ꓲ": "I", "ꓮ": "A", "ꓐ": "B",
    "ꓚ": "C", "ꓓ": "D", "ꓰ": "E", "ꓝ": "F", "ꓖ": "G", "ꓧ": "H", "ꓙ": "J", "ꓗ": "K", "ꓡ": "L",
    "ꓟ": "M", "ꓠ": "N", "ꓳ": "O", "ꓑ": "P", "ꓣ": "R", "ꓢ": "S", "ꓔ": "T", "ꓴ": "U", "ꓦ": "V",
    "ꓪ": "W", "ꓫ": "X", "ꓬ": "Y", "ꓜ": "Z",
}
HOMOGLYPHS: dict[int, str] = {ord(k): v for k, v in _HOMOGLYPH_PAIRS.items()}

# Letters that do not decompose under NFKD but carry an "accent" or ligature.
_FOLD_EXTRA: dict[int, str] = {ord(k): v for k, v in {
    "ø": "o", "đ": "d", "ł": "l", "ħ": "h", "ŧ": "t", "æ": "ae", "œ": "oe", "ð": "d", "þ": "th",
    "ŀ": "l", "ƀ": "b", "ɨ": "i", "ʉ": "u", "ƶ": "z", "ȥ": "z", "ɇ": "e",
}.items()}

# Typographic punctuation to ASCII, so names in curly quotes and with odd dashes match.
_PUNCT: dict[int, str] = {ord(k): v for k, v in {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
}.items()}

# Invisible characters beyond Unicode category Cf (which is removed wholesale): fillers that render
# as blanks, the combining grapheme joiner, variation selectors.
_INVISIBLE_EXTRA = {0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180E, 0x3164, 0xFFA0,
                    *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)}

_LEET: dict[str, str] = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s", "|": "l"}
_WS = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (after NFKC, before folding)
_TOKEN = re.compile(r"[^\W_]+")
_LEET_WORD = re.compile(r"[a-z0-9@$|]+")


def _is_invisible(ch: str) -> bool:
    """True for zero-width, bidi-control, tag and filler characters that render as nothing."""
    cp = ord(ch)
    return unicodedata.category(ch) == "Cf" or cp in _INVISIBLE_EXTRA


def strip_invisible(text: str) -> str:
    """Remove zero-width and other invisible characters that split a name without showing."""
    return "".join(ch for ch in text if not _is_invisible(ch))


def _map_word(match: re.Match[str]) -> str:
    """Map look-alikes in one word when every letter is Latin or a look-alike (a disguised Latin word)."""
    word = match.group(0)
    if not any(ord(c) in HOMOGLYPHS for c in word):
        return word
    for c in word:
        if ord(c) in HOMOGLYPHS or ("a" <= c.lower() <= "z" and c.isascii()):
            continue
        if unicodedata.category(c).startswith("M"):
            continue
        return word  # a genuine foreign-script word (it has a letter with no Latin twin)
    return word.translate(HOMOGLYPHS)


def map_homoglyphs(text: str) -> str:
    """Replace Cyrillic/Greek/other look-alike letters by Latin inside disguised Latin words."""
    return _WORD.sub(_map_word, text)


def fold_accents(text: str) -> str:
    """Drop diacritics (NFKD, combining marks removed) and fold letters like ``ø`` and ``ł``."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.category(c).startswith("M"))
    return unicodedata.normalize("NFC", stripped).translate(_FOLD_EXTRA)


@lru_cache(maxsize=65536)
def normalize_cased(text: str) -> str:
    """:func:`normalize` without case folding (capitals tell proper nouns apart)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize() expects str, got {type(text).__name__}")
    if text.isascii():  # fast path: nothing to fold but quotes and spacing
        return _WS.sub(" ", text.replace("`", "'")).strip()
    t = strip_invisible(text)
    t = unicodedata.normalize("NFKC", t)
    t = strip_invisible(t)  # NFKC can expose new format characters
    t = fold_accents(t)  # before look-alikes: "Ќ" is К plus an accent
    t = map_homoglyphs(t)
    t = t.translate(_PUNCT)
    return _WS.sub(" ", t).strip()


@lru_cache(maxsize=65536)
def normalize(text: str) -> str:
    """Canonical form of any input (prompt, name, stored text) so that obfuscated variants compare equal."""
    t = normalize_cased(text).casefold()
    if t.isascii():
        return t
    # Case folding can expose accents ("İ" -> "i" + dot) and lower-case look-alikes ("Ɑ" -> "ɑ").
    return _WS.sub(" ", map_homoglyphs(fold_accents(t)).casefold()).strip()


_SENT_START = re.compile(r"(?:^|[.!?:;\n]\s*|[\"(]\s*)$")
_NOT_PROPER = frozenset("""i i'm i've i'd i'll ok okay please thanks thank hello hi hey dear yes no
    what who whom whose which where when why how is are was were do does did can could would should will tell give
    name describe explain list write share provide mr mrs ms dr""".split())


def proper_nouns(cased: str) -> list[str]:
    """Capitalised words that do not start a sentence, as case-folded skeleton tokens (likely names, places, titles)."""
    out: list[str] = []
    for m in _TOKEN.finditer(cased):
        w = m.group(0)
        if not w[:1].isupper() or w.isdigit():
            continue
        if _SENT_START.search(cased[: m.start()]):
            continue
        low = w.casefold()
        if low in _NOT_PROPER:
            continue
        out.extend(skeleton_tokens(fold_accents(low)))
    return out


def tokens(normalized: str) -> list[str]:
    """Alphanumeric tokens of already-normalised text (punctuation and spacing dropped)."""
    return _TOKEN.findall(normalized)


def _unleet(match: re.Match[str]) -> str:
    """Undo leetspeak in a token that mixes letters with digits/symbols; leave pure numbers alone."""
    w = match.group(0)
    has_alpha = any("a" <= c <= "z" for c in w)
    has_leet = any(c in _LEET for c in w)
    if has_alpha and has_leet:
        return "".join(_LEET.get(c, c) for c in w)
    return w


def skeleton_tokens(normalized: str) -> list[str]:
    """Tokens for entity matching: leetspeak undone inside mixed letter/digit tokens."""
    return tokens(_LEET_WORD.sub(_unleet, normalized))
