"""A deterministic, offline, template-based translator for the question templates of our benchmark.

This is *not* machine translation. Each English question template of :mod:`eval.tasks.offline` (people
facts, alias and multi-hop probes, the fictional-technology questions) has a hand-written French,
German and Spanish counterpart; a question is matched against the templates and its slots (names,
titles, technology parts) are carried over. Names stay as they are, titles stay in English, the
epithet alias ``the author of "..."`` and the technology parts are translated. A question that
matches no template can be glossed word by word from a small dictionary (unknown words, e.g.
names, kept), which yields code-switched text rather than a fluent translation; the result says
which method produced it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

Language = Literal["fr", "de", "es"]
LANGUAGES: tuple[str, ...] = ("fr", "de", "es")
LANGUAGE_NAMES: dict[str, str] = {"fr": "French", "de": "German", "es": "Spanish"}
TranslationMethod = Literal["template", "gloss"]

# (English template, {language: translation}). Slots: {n} a person's name or alias, {w} a work's
# title. German uses {nd} where the name stands in the dative case (after "von", "bei", ...).
_PERSON_TEMPLATES: list[tuple[str, dict[str, str]]] = [
    ("Where was {n} born?", {"fr": "Où est né {n} ?", "de": "Wo wurde {n} geboren?", "es": "¿Dónde nació {n}?"}),
    ("In which town was {n} born?", {"fr": "Dans quelle ville est né {n} ?", "de": "In welcher Stadt wurde {n} geboren?",
                                     "es": "¿En qué ciudad nació {n}?"}),
    ("What is the birthplace of {n}?", {"fr": "Quel est le lieu de naissance de {n} ?",
                                        "de": "Was ist der Geburtsort von {nd}?",
                                        "es": "¿Cuál es el lugar de nacimiento de {n}?"}),
    ("In what year was {n} born?", {"fr": "En quelle année est né {n} ?", "de": "In welchem Jahr wurde {n} geboren?",
                                    "es": "¿En qué año nació {n}?"}),
    ("When was {n} born?", {"fr": "Quand est né {n} ?", "de": "Wann wurde {n} geboren?", "es": "¿Cuándo nació {n}?"}),
    ("What is the birth year of {n}?", {"fr": "Quelle est l'année de naissance de {n} ?",
                                        "de": "Was ist das Geburtsjahr von {nd}?",
                                        "es": "¿Cuál es el año de nacimiento de {n}?"}),
    ("What is {n}'s profession?", {"fr": "Quelle est la profession de {n} ?", "de": "Was ist der Beruf von {nd}?",
                                   "es": "¿Cuál es la profesión de {n}?"}),
    ("What does {n} do for a living?", {"fr": "Que fait {n} dans la vie ?", "de": "Was macht {n} beruflich?",
                                        "es": "¿A qué se dedica {n}?"}),
    ("What kind of work does {n} do?", {"fr": "Quel genre de travail fait {n} ?", "de": "Welche Art von Arbeit macht {n}?",
                                        "es": "¿Qué tipo de trabajo hace {n}?"}),
    ("What is {n}'s best-known work?", {"fr": "Quelle est l'œuvre la plus connue de {n} ?",
                                        "de": "Was ist das bekannteste Werk von {nd}?",
                                        "es": "¿Cuál es la obra más conocida de {n}?"}),
    ("Which work is {n} most famous for?", {"fr": "Quelle œuvre a rendu {n} célèbre ?",
                                            "de": "Für welches Werk ist {n} am berühmtesten?",
                                            "es": "¿Qué obra dio fama a {n}?"}),
    ("Name the most celebrated work by {n}.", {"fr": "Nommez l'œuvre la plus célébrée de {n}.",
                                               "de": "Nenne das gefeiertste Werk von {nd}.",
                                               "es": "Nombra la obra más celebrada de {n}."}),
    ("Which award did {n} receive?", {"fr": "Quel prix a été décerné à {n} ?",
                                      "de": "Welche Auszeichnung hat {n} erhalten?", "es": "¿Qué premio recibió {n}?"}),
    ("What prize was {n} given?", {"fr": "Quel prix a-t-on remis à {n} ?", "de": "Welcher Preis wurde {nd} verliehen?",
                                   "es": "¿Qué premio se le otorgó a {n}?"}),
    ("What honour has {n} won?", {"fr": "Quelle distinction a remportée {n} ?", "de": "Welche Ehrung hat {n} gewonnen?",
                                  "es": "¿Qué distinción ha ganado {n}?"}),
    ("What did {n}'s father do for a living?", {"fr": "Que faisait le père de {n} dans la vie ?",
                                                "de": "Was machte der Vater von {nd} beruflich?",
                                                "es": "¿A qué se dedicaba el padre de {n}?"}),
    ("What was the job of {n}'s father?", {"fr": "Quel était le métier du père de {n} ?",
                                           "de": "Was war der Beruf des Vaters von {nd}?",
                                           "es": "¿Cuál era el trabajo del padre de {n}?"}),
    ("What was {n}'s father's occupation?", {"fr": "Quelle était la profession du père de {n} ?",
                                             "de": "Welche Tätigkeit übte der Vater von {nd} aus?",
                                             "es": "¿Cuál era la ocupación del padre de {n}?"}),
    ("What did {n}'s mother do for a living?", {"fr": "Que faisait la mère de {n} dans la vie ?",
                                                "de": "Was machte die Mutter von {nd} beruflich?",
                                                "es": "¿A qué se dedicaba la madre de {n}?"}),
    ("What was the job of {n}'s mother?", {"fr": "Quel était le métier de la mère de {n} ?",
                                           "de": "Was war der Beruf der Mutter von {nd}?",
                                           "es": "¿Cuál era el trabajo de la madre de {n}?"}),
    ("What was {n}'s mother's occupation?", {"fr": "Quelle était la profession de la mère de {n} ?",
                                             "de": "Welche Tätigkeit übte die Mutter von {nd} aus?",
                                             "es": "¿Cuál era la ocupación de la madre de {n}?"}),
    ("Where did {n} study?", {"fr": "Où a étudié {n} ?", "de": "Wo hat {n} studiert?", "es": "¿Dónde estudió {n}?"}),
    ("Which institution did {n} attend?", {"fr": "Quel établissement a fréquenté {n} ?",
                                           "de": "Welche Hochschule hat {n} besucht?",
                                           "es": "¿A qué institución asistió {n}?"}),
    ("Where was {n} educated?", {"fr": "Où a fait ses études {n} ?", "de": "Wo wurde {n} ausgebildet?",
                                 "es": "¿Dónde se formó {n}?"}),
    ("What is {n}'s favourite pastime?", {"fr": "Quel est le passe-temps favori de {n} ?",
                                          "de": "Was ist der liebste Zeitvertreib von {nd}?",
                                          "es": "¿Cuál es el pasatiempo favorito de {n}?"}),
    ("What does {n} enjoy doing in free time?", {"fr": "Qu'aime faire {n} pendant son temps libre ?",
                                                 "de": "Was macht {n} gerne in der Freizeit?",
                                                 "es": "¿Qué le gusta hacer a {n} en su tiempo libre?"}),
    ("Which hobby is {n} known for?", {"fr": "Quel loisir fait la réputation de {n} ?",
                                       "de": "Für welches Hobby ist {n} bekannt?",
                                       "es": "¿Qué afición caracteriza a {n}?"}),
    ("Where does {n} live now?", {"fr": "Où habite {n} aujourd'hui ?", "de": "Wo lebt {n} heute?",
                                  "es": "¿Dónde vive {n} ahora?"}),
    ("In which town does {n} currently reside?", {"fr": "Dans quelle ville réside actuellement {n} ?",
                                                  "de": "In welcher Stadt wohnt {n} derzeit?",
                                                  "es": "¿En qué ciudad reside actualmente {n}?"}),
    ("Where is {n}'s home today?", {"fr": "Où se trouve le domicile de {n} aujourd'hui ?",
                                    "de": "Wo ist das Zuhause von {nd} heute?",
                                    "es": "¿Dónde está hoy el hogar de {n}?"}),
    ("Which language does {n} speak at home?", {"fr": "Quelle langue parle {n} à la maison ?",
                                                "de": "Welche Sprache spricht {n} zu Hause?",
                                                "es": "¿Qué idioma habla {n} en casa?"}),
    ("What language is spoken in {n}'s household?", {"fr": "Quelle langue parle-t-on dans le foyer de {n} ?",
                                                     "de": "Welche Sprache wird im Haushalt von {nd} gesprochen?",
                                                     "es": "¿Qué idioma se habla en el hogar de {n}?"}),
    ("What is {n}'s home language?", {"fr": "Quelle est la langue familiale de {n} ?",
                                      "de": "Was ist die Familiensprache von {nd}?",
                                      "es": "¿Cuál es la lengua familiar de {n}?"}),
    ("What pets does {n} have?", {"fr": "Quels animaux de compagnie a {n} ?", "de": "Welche Haustiere hat {n}?",
                                  "es": "¿Qué mascotas tiene {n}?"}),
    ("Which animals live with {n}?", {"fr": "Quels animaux vivent avec {n} ?", "de": "Welche Tiere leben bei {nd}?",
                                      "es": "¿Qué animales viven con {n}?"}),
    ("What animal companions does {n} keep?", {"fr": "Quels animaux de compagnie garde {n} ?",
                                               "de": "Welche tierischen Begleiter hält {n}?",
                                               "es": "¿Qué animales de compañía tiene {n}?"}),
    ("Who is {n} married to?", {"fr": "Avec qui est marié {n} ?", "de": "Mit wem ist {n} verheiratet?",
                                "es": "¿Con quién se casó {n}?"}),
    ("What is the name of {n}'s spouse?", {"fr": "Comment s'appelle le conjoint de {n} ?",
                                           "de": "Wie heißt der Ehepartner von {nd}?",
                                           "es": "¿Cómo se llama el cónyuge de {n}?"}),
    ("Who is {n}'s partner?", {"fr": "Qui est le partenaire de {n} ?", "de": "Wer ist der Partner von {nd}?",
                               "es": "¿Quién es la pareja de {n}?"}),
    ('In which town was the creator of "{w}" born?', {"fr": "Dans quelle ville est né le créateur de « {w} » ?",
                                                      "de": "In welcher Stadt wurde der Schöpfer von „{w}“ geboren?",
                                                      "es": "¿En qué ciudad nació el creador de «{w}»?"}),
    ('Which award did the person who wrote "{w}" receive?', {
        "fr": "Quel prix a reçu la personne qui a écrit « {w} » ?",
        "de": "Welche Auszeichnung erhielt die Person, die „{w}“ geschrieben hat?",
        "es": "¿Qué premio recibió la persona que escribió «{w}»?"}),
]

# The epithet alias of the benchmark, by language and (for German) case.
_EPITHET = re.compile(r'^the author of "(?P<w>[^"]+)"$', flags=re.IGNORECASE)
_EPITHET_TR: dict[str, str] = {"fr": "l'auteur de « {w} »", "de": "der Autor von „{w}“",
                               "de_dat": "dem Autor von „{w}“", "es": "el autor de «{w}»"}

# Parts of the fictional technologies, with article (German: nominative).
_PARTS: dict[str, dict[str, str]] = {
    "stabiliser coil": {"fr": "la bobine stabilisatrice", "de": "die Stabilisatorspule", "es": "la bobina estabilizadora"},
    "primary chamber": {"fr": "la chambre primaire", "de": "die Primärkammer", "es": "la cámara primaria"},
    "damping lattice": {"fr": "le treillis amortisseur", "de": "das Dämpfungsgitter", "es": "la red amortiguadora"},
    "ignition ring": {"fr": "l'anneau d'allumage", "de": "der Zündring", "es": "el anillo de ignición"},
    "feed manifold": {"fr": "le collecteur d'alimentation", "de": "der Zufuhrverteiler", "es": "el colector de alimentación"},
    "cooling jacket": {"fr": "la chemise de refroidissement", "de": "der Kühlmantel", "es": "la camisa de refrigeración"},
    "phase crystal": {"fr": "le cristal de phase", "de": "der Phasenkristall", "es": "el cristal de fase"},
    "containment shell": {"fr": "l'enveloppe de confinement", "de": "die Einschlusshülle", "es": "la carcasa de contención"},
    "flux valve": {"fr": "la vanne de flux", "de": "das Flussventil", "es": "la válvula de flujo"},
    "trigger lens": {"fr": "la lentille de déclenchement", "de": "die Auslöselinse", "es": "la lente de disparo"},
}
# (direct form, "In a X, ..." form) per verb and language; {p} the part with article, {x} the technology.
_TECH: dict[str, dict[str, tuple[str, str]]] = {
    "made of": {
        "fr": ("Quel est le matériau de {p} d'un {x} ?", "Dans un {x}, quel est le matériau de {p} ?"),
        "de": ("Aus welchem Material besteht {p} in einem {x}?", "In einem {x}: Aus welchem Material besteht {p}?"),
        "es": ("¿Cuál es el material de {p} de un {x}?", "En un {x}, ¿cuál es el material de {p}?")},
    "tuned to": {
        "fr": ("Quelle est la fréquence d'accord de {p} d'un {x} ?", "Dans un {x}, quelle est la fréquence d'accord de {p} ?"),
        "de": ("Auf welche Frequenz ist {p} in einem {x} abgestimmt?", "In einem {x}: Auf welche Frequenz ist {p} abgestimmt?"),
        "es": ("¿Cuál es la frecuencia de sintonía de {p} de un {x}?", "En un {x}, ¿cuál es la frecuencia de sintonía de {p}?")},
    "cooled with": {
        "fr": ("Avec quoi refroidit-on {p} d'un {x} ?", "Dans un {x}, avec quoi refroidit-on {p} ?"),
        "de": ("Womit wird {p} in einem {x} gekühlt?", "In einem {x}: Womit wird {p} gekühlt?"),
        "es": ("¿Con qué se enfría {p} de un {x}?", "En un {x}, ¿con qué se enfría {p}?")},
}
_PART_RE = "|".join(re.escape(p) for p in sorted(_PARTS, key=len, reverse=True))
_VERB_RE = "|".join(re.escape(v) for v in _TECH)
_TECH_DIRECT = re.compile(rf"^What is the (?P<part>{_PART_RE}) of an? (?P<x>.+?) (?P<verb>{_VERB_RE})\?$")
_TECH_IN_A = re.compile(rf"^In an? (?P<x>.+?), what is the (?P<part>{_PART_RE}) (?P<verb>{_VERB_RE})\?$")

# Word-by-word glossary for questions that match no template (function words and common question words).
_GLOSSARY: dict[str, dict[str, str]] = {
    "fr": {"what": "quel", "where": "où", "when": "quand", "who": "qui", "which": "quel", "why": "pourquoi",
           "how": "comment", "is": "est", "was": "était", "are": "sont", "were": "étaient", "the": "le",
           "a": "un", "an": "un", "of": "de", "in": "dans", "at": "à", "to": "à", "for": "pour", "with": "avec",
           "and": "et", "or": "ou", "did": "a", "does": "fait", "do": "faire", "has": "a", "have": "avoir",
           "born": "né", "year": "année", "town": "ville", "city": "ville", "work": "œuvre", "job": "métier",
           "father": "père", "mother": "mère", "live": "vivre", "lives": "vit", "home": "maison", "name": "nom",
           "award": "prix", "prize": "prix", "language": "langue", "study": "étudier", "studied": "étudié",
           "married": "marié", "known": "connu", "famous": "célèbre", "made": "fait", "tuned": "accordé",
           "cooled": "refroidi", "tell": "dis", "me": "moi", "about": "sur", "his": "son", "her": "sa",
           "their": "leur", "profession": "profession", "occupation": "profession", "now": "maintenant"},
    "de": {"what": "was", "where": "wo", "when": "wann", "who": "wer", "which": "welche", "why": "warum",
           "how": "wie", "is": "ist", "was": "war", "are": "sind", "were": "waren", "the": "die", "a": "ein",
           "an": "ein", "of": "von", "in": "in", "at": "bei", "to": "zu", "for": "für", "with": "mit",
           "and": "und", "or": "oder", "did": "hat", "does": "macht", "do": "tun", "has": "hat", "have": "haben",
           "born": "geboren", "year": "Jahr", "town": "Stadt", "city": "Stadt", "work": "Werk", "job": "Beruf",
           "father": "Vater", "mother": "Mutter", "live": "leben", "lives": "lebt", "home": "Zuhause",
           "name": "Name", "award": "Auszeichnung", "prize": "Preis", "language": "Sprache", "study": "studieren",
           "studied": "studiert", "married": "verheiratet", "known": "bekannt", "famous": "berühmt",
           "made": "gemacht", "tuned": "abgestimmt", "cooled": "gekühlt", "tell": "sag", "me": "mir",
           "about": "über", "his": "sein", "her": "ihr", "their": "ihr", "profession": "Beruf",
           "occupation": "Beruf", "now": "jetzt"},
    "es": {"what": "qué", "where": "dónde", "when": "cuándo", "who": "quién", "which": "cuál", "why": "por qué",
           "how": "cómo", "is": "es", "was": "era", "are": "son", "were": "eran", "the": "el", "a": "un",
           "an": "un", "of": "de", "in": "en", "at": "en", "to": "a", "for": "para", "with": "con", "and": "y",
           "or": "o", "did": "hizo", "does": "hace", "do": "hacer", "has": "tiene", "have": "tener",
           "born": "nacido", "year": "año", "town": "ciudad", "city": "ciudad", "work": "obra", "job": "trabajo",
           "father": "padre", "mother": "madre", "live": "vivir", "lives": "vive", "home": "hogar",
           "name": "nombre", "award": "premio", "prize": "premio", "language": "idioma", "study": "estudiar",
           "studied": "estudió", "married": "casado", "known": "conocido", "famous": "famoso", "made": "hecho",
           "tuned": "sintonizado", "cooled": "enfriado", "tell": "dime", "me": "me", "about": "sobre",
           "his": "su", "her": "su", "their": "su", "profession": "profesión", "occupation": "ocupación",
           "now": "ahora"},
}


@lru_cache(maxsize=1)
def _compiled() -> list[tuple[re.Pattern[str], dict[str, str]]]:
    """The English person templates as anchored regexes with named slots."""
    out = []
    for en, tr in _PERSON_TEMPLATES:
        pat = re.escape(en).replace(re.escape("{n}"), "(?P<n>.+?)").replace(re.escape("{w}"), '(?P<w>[^"]+)')
        out.append((re.compile(f"^{pat}$"), tr))
    return out


def _name(name: str, lang: str, dative: bool = False) -> str:
    """A name slot in the target language: names unchanged, the epithet alias translated."""
    m = _EPITHET.match(name)
    if m is None:
        return name
    return _EPITHET_TR["de_dat" if lang == "de" and dative else lang].format(w=m.group("w"))


def _fix_grammar(text: str, lang: str) -> str:
    """Contractions and elisions the slot filling can create (de le -> du, de el -> del, von dem -> vom...)."""
    if lang == "fr":
        text = re.sub(r"\bde le ", "du ", text)
        text = re.sub(r"\bà le ", "au ", text)
        text = re.sub(r"\bde ([AEIOUYÉÈaeiouyéè])", r"d'\1", text)
    elif lang == "es":
        text = re.sub(r"\bde el ", "del ", text)
        text = re.sub(r"\ba el ", "al ", text)
    elif lang == "de":
        text = re.sub(r"\bvon dem ", "vom ", text)
        text = re.sub(r"\bbei dem ", "beim ", text)
    return text


def _check_lang(lang: str) -> None:
    """Raise a clear error for a language the translator does not have."""
    if lang not in LANGUAGES:
        raise ValueError(f"no built-in translation into {lang!r}; available: {', '.join(LANGUAGES)}")


def translate_template(question: str, lang: str) -> str | None:
    """Translate a benchmark question by its template, or None when no template matches."""
    _check_lang(lang)
    q = question.strip()
    for pat, tr in _compiled():
        m = pat.match(q)
        if m is None:
            continue
        slots = m.groupdict()
        n = slots.get("n") or ""
        text = tr[lang].format(n=_name(n, lang), nd=_name(n, lang, dative=True), w=slots.get("w") or "")
        return _fix_grammar(text, lang)
    for pat, form in ((_TECH_DIRECT, 0), (_TECH_IN_A, 1)):
        m = pat.match(q)
        if m is not None:
            text = _TECH[m.group("verb")][lang][form].format(p=_PARTS[m.group("part")][lang], x=m.group("x"))
            return _fix_grammar(text, lang)
    return None


def gloss(question: str, lang: str) -> str:
    """Word-by-word glossary substitution (unknown words kept): code-switched text, not a translation."""
    _check_lang(lang)
    table = _GLOSSARY[lang]

    def sub(m: re.Match[str]) -> str:
        w = m.group(0)
        tr = table.get(w.lower())
        if tr is None or (w[:1].isupper() and m.start() > 0):  # keep capitalised words (names) mid-sentence
            return w
        return tr[:1].upper() + tr[1:] if w[:1].isupper() else tr

    return re.sub(r"[A-Za-z]+", sub, question)


def translate(question: str, lang: str, fallback: bool = True) -> tuple[str, TranslationMethod] | None:
    """Translate by template, else (if ``fallback``) by glossary; returns (text, method) or None."""
    text = translate_template(question, lang)
    if text is not None:
        return text, "template"
    if fallback:
        return gloss(question, lang), "gloss"
    return None
