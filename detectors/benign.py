"""A built-in pool of generic benign questions, so the detector can be trained and calibrated offline.

The pool mixes everyday requests, general knowledge and, on purpose, biography-style questions about
well-known real people and places: they share the templates of forget questions ("Where was X
born?") and so are the hard negatives that keep the false-positive rate honest. Generated
deterministically from small word lists (no data download, no randomness).
"""

from __future__ import annotations

from functools import lru_cache

_PEOPLE = [
    "Albert Einstein", "Marie Curie", "Isaac Newton", "Ada Lovelace", "Charles Darwin", "Jane Austen",
    "Leonardo da Vinci", "Wolfgang Amadeus Mozart", "Frida Kahlo", "Nelson Mandela", "Mahatma Gandhi",
    "Florence Nightingale", "Nikola Tesla", "Virginia Woolf", "Pablo Picasso", "Ludwig van Beethoven",
    "Galileo Galilei", "Rosalind Franklin", "Mark Twain", "Agatha Christie", "Vincent van Gogh",
    "Alan Turing", "Amelia Earhart", "Johann Sebastian Bach", "Charles Dickens", "Gabriel Garcia Marquez",
    "Toni Morrison", "Louis Pasteur", "Claude Monet", "Katherine Johnson",
]
_BIO_TEMPLATES = [
    "Where was {p} born?", "What is {p} best known for?", "When did {p} die?", "What was {p}'s profession?",
    "Who were the parents of {p}?", "Which awards did {p} receive?", "Where did {p} study?",
    "Tell me a fun fact about {p}.", "What did {p} write or create?", "Summarise the life of {p} in two sentences.",
]
_COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "India", "Mexico", "Egypt", "Australia",
              "Germany", "Chile", "Vietnam", "Portugal", "Morocco", "New Zealand", "Argentina", "Poland", "Ghana", "Peru"]
_COUNTRY_TEMPLATES = [
    "What is the capital of {c}?", "What language is spoken in {c}?", "What is the currency of {c}?",
    "What is a traditional dish from {c}?", "What is the climate like in {c}?", "What is the population of {c}?",
]
_HOWTO = [
    "bake sourdough bread", "change a flat tyre", "write a cover letter", "learn to touch type", "plant tomatoes",
    "fix a leaking tap", "start running as a beginner", "remove a coffee stain", "sharpen a kitchen knife",
    "make a budget spreadsheet", "tie a bowline knot", "train a puppy to sit", "improve my sleep",
    "prepare for a job interview", "brew cold coffee", "clean a cast iron pan", "set up a home wifi network",
    "write a haiku", "meditate for ten minutes", "back up my phone", "make pancakes", "learn a new language",
    "reduce food waste", "paint a room", "care for a succulent", "negotiate a salary", "study for an exam",
    "organise my closet", "make a paper aeroplane", "keep basil alive indoors",
]
_CONCEPTS = [
    "photosynthesis", "inflation", "machine learning", "the theory of relativity", "blockchain", "plate tectonics",
    "the immune system", "compound interest", "natural selection", "quantum entanglement", "supply and demand",
    "the greenhouse effect", "recursion in programming", "the water cycle", "black holes", "democracy",
    "the Pythagorean theorem", "entropy", "vaccination", "the stock market", "climate change", "the Doppler effect",
    "a neural network", "the French Revolution", "the Renaissance", "continental drift", "osmosis",
    "the placebo effect", "opportunity cost", "the speed of sound",
]
_CONCEPT_TEMPLATES = ["Explain {x} in simple terms.", "What is {x}?", "Why does {x} matter?", "Give me an example of {x}."]
_MISC = [
    "What is the boiling point of water?", "How many planets are in the solar system?", "What is 12 times 12?",
    "Recommend a good science fiction novel.", "What should I cook for dinner tonight?", "Write a limerick about a cat.",
    "What is the difference between a virus and a bacterium?", "How long should I boil pasta?",
    "What is the tallest building in the world?", "Suggest a name for a bakery.", "How do airplanes stay in the air?",
    "Convert 100 degrees Fahrenheit to Celsius.", "What is the largest desert on Earth?", "Why do cats purr?",
    "What are some tips for public speaking?", "How does a refrigerator work?", "What is the fastest land animal?",
    "Write a short thank-you note to a colleague.", "How many hours of sleep do adults need?",
    "What is the meaning of the word 'ephemeral'?", "Plan a three-day trip to Rome.", "What is a good stretching routine?",
    "Which fruits are high in vitamin C?", "How do I calculate the area of a circle?", "What is an index fund?",
    "Who invented the telephone?", "What year did the Second World War end?", "How many teeth do adults have?",
    "What is the chemical formula of water?", "What is the largest mammal?", "Describe the rules of chess briefly.",
    "What causes thunder?", "How do solar panels produce electricity?", "What is a palindrome?",
    "Write a tweet announcing a book club meeting.", "What is the difference between affect and effect?",
    "Give me three ideas for a birthday party.", "How do I say good morning in Spanish?", "What is a mortgage?",
    "What are the symptoms of dehydration?", "Which instrument has the lowest pitch in an orchestra?",
    "How old is the universe?", "What is the capital city of the United States?", "Why do leaves change colour in autumn?",
    "What is the main function of the heart?", "How many sides does a hexagon have?", "What is a sonnet?",
    "Recommend a board game for four players.", "How do I write a for loop in Python?", "What is SQL used for?",
    "Who composed the Four Seasons?", "Who painted The Starry Night?", "Who wrote Pride and Prejudice?",
    "Which author wrote the novel 1984?", "Who wrote One Hundred Years of Solitude?", "Who is the author of Hamlet?",
    "What genre is The Lord of the Rings?", "Name a famous novel by Leo Tolstoy.", "What inspired Mary Shelley to write Frankenstein?",
    "Which literary prizes are the most prestigious?", "What is magical realism in literature?",
    "How does a writer find a literary agent?", "What makes a good mystery novel?", "Who won the Nobel Prize in Literature in 2016?",
    "What is the difference between a novel and a novella?", "How do I start writing a memoir?",
    "What is a pen name?", "Which city is home to the Louvre?", "What is the population of Tokyo?",
    "Where is Mount Kilimanjaro?", "What river flows through Paris?", "Which country has the most islands?",
]


@lru_cache(maxsize=1)
def builtin_benign_questions() -> tuple[str, ...]:
    """Return the built-in benign questions (several hundred, deterministic, deduplicated)."""
    out: list[str] = []
    for i, p in enumerate(_PEOPLE):
        # Three templates per person, rotating, so every template meets several people.
        for j in range(3):
            out.append(_BIO_TEMPLATES[(i + j * 3) % len(_BIO_TEMPLATES)].format(p=p))
    for i, c in enumerate(_COUNTRIES):
        for j in range(3):
            out.append(_COUNTRY_TEMPLATES[(i + j * 2) % len(_COUNTRY_TEMPLATES)].format(c=c))
    for i, h in enumerate(_HOWTO):
        out.append(("How do I {h}?", "What is the best way to {h}?", "Can you explain how to {h}?")[i % 3].format(h=h))
    for i, x in enumerate(_CONCEPTS):
        for j in range(2):
            out.append(_CONCEPT_TEMPLATES[(i + j) % len(_CONCEPT_TEMPLATES)].format(x=x))
    out.extend(_MISC)
    seen: set[str] = set()
    uniq = [q for q in out if not (q in seen or seen.add(q))]
    return tuple(uniq)
