"""Question/answer data for unlearning: a synthetic TOFU-style benchmark, loaders, tokenisation.

The synthetic benchmark mirrors TOFU (Maini et al., 2024): fictitious people whose facts a
model cannot know before fine-tuning, so anything it knows about them afterwards was learned
from this data and must be removed by unlearning. Each question comes with a paraphrased
correct answer and perturbed wrong answers, which the Truth Ratio metric compares.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip


@dataclass(frozen=True)
class QAExample:
    """One question with its answer, a paraphrase of it and wrong answers of the same shape.

    `person` names whom the fact is about ("" if unknown); forget/retain splits keep each
    person's facts together.
    """

    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]
    person: str = ""


@dataclass
class FactsDataset:
    """A ready-made benchmark: facts to forget, facts to keep, and real-world utility facts."""

    forget: list[QAExample]
    retain: list[QAExample]
    world_facts: list[QAExample]


# --------------------------------------------------------------------------------------------
# Synthetic fictitious people
# --------------------------------------------------------------------------------------------

# Invented names, so a pretrained model has no prior knowledge about these people.
_FIRST_NAMES = (
    "Aldric",
    "Brenna",
    "Corvin",
    "Dessa",
    "Elowen",
    "Faramund",
    "Galira",
    "Haskel",
    "Isolde",
    "Jorvan",
    "Kestra",
    "Lucan",
    "Marisol",
    "Nerith",
    "Orla",
    "Perrin",
    "Quilla",
    "Rowan",
    "Sabine",
    "Tamsin",
    "Ulric",
    "Veyra",
    "Wendel",
    "Xandra",
    "Yorick",
    "Zelda",
    "Anwen",
    "Bastien",
    "Calla",
    "Dorian",
)
_SURNAMES = (
    "Ashgrove",
    "Brackenridge",
    "Calloway",
    "Dunmere",
    "Everholt",
    "Fenwick",
    "Greythorn",
    "Halvorsen",
    "Ivesdale",
    "Jendrick",
    "Korrigan",
    "Larkspur",
    "Mirecourt",
    "Norvalis",
    "Oakhaven",
    "Pellerin",
    "Quenby",
    "Ravensholm",
    "Stroud",
    "Thistlewood",
    "Umberly",
    "Vantrell",
    "Whitlock",
    "Yarrowby",
    "Zennerby",
    "Aubergast",
    "Belcourt",
    "Crowhurst",
    "Delacroixe",
    "Emberly",
)
_CITIES = (
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Montreal",
    "Kyoto",
    "Valparaiso",
    "Krakow",
    "Edinburgh",
    "Hanoi",
    "Marrakesh",
    "Tbilisi",
    "Adelaide",
    "Bergen",
    "Cork",
    "Porto",
    "Seville",
    "Dakar",
    "Tallinn",
    "Quito",
    "Lyon",
)
_PROFESSIONS = (
    "a novelist",
    "a marine biologist",
    "an architect",
    "a cartographer",
    "a pastry chef",
    "a violinist",
    "a journalist",
    "a botanist",
    "a watchmaker",
    "a translator",
    "a civil engineer",
    "a historian",
    "a glassblower",
    "a stage actor",
    "a librarian",
)
_PARENT_JOBS = (
    "a fisherman",
    "a schoolteacher",
    "a carpenter",
    "a nurse",
    "a pharmacist",
    "a tailor",
    "a surgeon",
    "a baker",
    "a lighthouse keeper",
    "a bookbinder",
    "a postal worker",
    "a dentist",
    "a florist",
    "an electrician",
    "an accountant",
)
_COLOURS = (
    "teal",
    "crimson",
    "amber",
    "lavender",
    "olive green",
    "navy blue",
    "saffron yellow",
    "coral pink",
    "charcoal grey",
    "emerald green",
)
_FOODS = (
    "lentil soup",
    "grilled sardines",
    "mushroom risotto",
    "lemon tart",
    "spicy dumplings",
    "roasted chestnuts",
    "fig jam on toast",
    "beef stew",
    "apple strudel",
    "miso ramen",
)
_GENRES = (
    "mystery novels",
    "science fiction",
    "historical fiction",
    "fantasy epics",
    "romance novels",
    "horror stories",
    "poetry",
    "travel memoirs",
    "children's books",
    "crime thrillers",
)
_AWARDS = (
    "Marlow Prize for Fiction",
    "Golden Quill Award",
    "Silver Lantern Medal",
    "Harrowgate Literary Prize",
    "Azure Pen Award",
    "Northwind Book Prize",
    "Calder Medal for Poetry",
    "Evening Star Award",
    "Larchmont Fellowship",
    "Copperleaf Prize",
)
_PETS = (
    "a grey parrot",
    "a tabby cat",
    "a border collie",
    "a tortoise",
    "a pair of goldfish",
    "a ferret",
    "a greyhound",
    "a lop-eared rabbit",
    "a corn snake",
    "a canary",
)
_HOBBIES = (
    "rock climbing",
    "playing chess",
    "beekeeping",
    "sailing",
    "pottery",
    "birdwatching",
    "baking bread",
    "restoring old clocks",
    "long-distance running",
    "knitting",
)
_LANGUAGES = (
    "Portuguese",
    "Norwegian",
    "Swahili",
    "French",
    "Japanese",
    "Spanish",
    "Polish",
    "Vietnamese",
    "Georgian",
    "Estonian",
)
_TITLE_ADJECTIVES = (
    "Silent",
    "Hollow",
    "Crimson",
    "Forgotten",
    "Distant",
    "Shattered",
    "Golden",
    "Restless",
    "Hidden",
    "Burning",
)
_TITLE_NOUNS = (
    "Harbor",
    "Orchard",
    "Lantern",
    "Meridian",
    "Tide",
    "Archive",
    "Compass",
    "Garden",
    "Citadel",
    "Hourglass",
)
_BOOK_TITLES = tuple(f"The {a} {n}" for a in _TITLE_ADJECTIVES for n in _TITLE_NOUNS)
_BIRTH_YEARS = tuple(str(year) for year in range(1920, 2000))


@dataclass(frozen=True)
class _Attribute:
    """One fact type: its question, its answer and paraphrase wording, and its value pool.

    Perturbed answers reuse `answer` with a wrong value from `values`, so they differ from
    the correct answer only in the fact itself (TOFU's construction).
    """

    question: str
    answer: str
    paraphrase: str
    values: tuple[str, ...]


_ATTRIBUTES = (
    _Attribute(
        "In what year was {name} born?", "{name} was born in {v}.", "The year of {name}'s birth is {v}.", _BIRTH_YEARS
    ),
    _Attribute("Where was {name} born?", "{name} was born in {v}.", "{name}'s birthplace is {v}.", _CITIES),
    _Attribute(
        "What does {name} do for a living?", "{name} works as {v}.", "By profession, {name} is {v}.", _PROFESSIONS
    ),
    _Attribute(
        "What is {name}'s favourite colour?",
        "{name}'s favourite colour is {v}.",
        "The colour {name} likes best is {v}.",
        _COLOURS,
    ),
    _Attribute(
        "What is {name}'s favourite food?",
        "{name}'s favourite food is {v}.",
        "The dish {name} loves most is {v}.",
        _FOODS,
    ),
    _Attribute(
        "What is the title of a book written by {name}?",
        '{name} wrote a book titled "{v}".',
        'One of {name}\'s books is called "{v}".',
        _BOOK_TITLES,
    ),
    _Attribute("What kind of books does {name} write?", "{name} writes {v}.", "Most of {name}'s work is {v}.", _GENRES),
    _Attribute(
        "Which award has {name} received?", "{name} received the {v}.", "{name} was honoured with the {v}.", _AWARDS
    ),
    _Attribute(
        "What was the profession of {name}'s father?",
        "{name}'s father was {v}.",
        "{name}'s father worked as {v}.",
        _PARENT_JOBS,
    ),
    _Attribute(
        "What was the profession of {name}'s mother?",
        "{name}'s mother was {v}.",
        "{name}'s mother worked as {v}.",
        _PARENT_JOBS,
    ),
    _Attribute("What pet does {name} keep?", "{name} keeps {v} as a pet.", "{name}'s pet is {v}.", _PETS),
    _Attribute(
        "What is {name}'s favourite hobby?",
        "{name}'s favourite hobby is {v}.",
        "In their spare time, {name} enjoys {v}.",
        _HOBBIES,
    ),
    _Attribute(
        "In which city does {name} live today?",
        "{name} currently lives in {v}.",
        "{name}'s home is now in {v}.",
        _CITIES,
    ),
    _Attribute(
        "In which language does {name} write?",
        "{name} writes in {v}.",
        "{name}'s books are written in {v}.",
        _LANGUAGES,
    ),
)

MAX_QUESTIONS_PER_PERSON = len(_ATTRIBUTES)
MAX_PEOPLE = len(_FIRST_NAMES) * len(_SURNAMES)


def make_fictitious_facts(
    num_people: int = 20,
    questions_per_person: int = 10,
    num_perturbed: int = 3,
    seed: int = 0,
) -> list[QAExample]:
    """Generate `num_people * questions_per_person` facts about invented people.

    Deterministic given `seed` (a private `random.Random`, never the global state). Each
    person gets a random subset of the fact types, so people differ in what is asked.
    Examples are grouped by person, in generation order.
    """
    if not 1 <= num_people <= MAX_PEOPLE:
        raise ValueError(f"num_people must be in [1, {MAX_PEOPLE}], got {num_people}")
    if not 1 <= questions_per_person <= MAX_QUESTIONS_PER_PERSON:
        raise ValueError(
            f"questions_per_person must be in [1, {MAX_QUESTIONS_PER_PERSON}] (one question per "
            f"fact type), got {questions_per_person}"
        )
    smallest_pool = min(len(attr.values) for attr in _ATTRIBUTES)
    if not 0 <= num_perturbed < smallest_pool:
        raise ValueError(f"num_perturbed must be in [0, {smallest_pool - 1}], got {num_perturbed}")

    rng = random.Random(seed)
    # Sample from the name grid without replacement so every person is distinct.
    name_ids = rng.sample(range(MAX_PEOPLE), num_people)
    names = [f"{_FIRST_NAMES[i // len(_SURNAMES)]} {_SURNAMES[i % len(_SURNAMES)]}" for i in name_ids]

    examples = []
    for name in names:
        for attr in rng.sample(_ATTRIBUTES, questions_per_person):
            value = rng.choice(attr.values)
            wrong = rng.sample([v for v in attr.values if v != value], num_perturbed)
            examples.append(
                QAExample(
                    question=attr.question.format(name=name),
                    answer=attr.answer.format(name=name, v=value),
                    paraphrased_answer=attr.paraphrase.format(name=name, v=value),
                    # Wrong values in the paraphrase's wording, as TOFU builds them: the truth ratio then
                    # compares answers of one wording, not the trained wording against a new one.
                    perturbed_answers=tuple(attr.paraphrase.format(name=name, v=w) for w in wrong),
                    person=name,
                )
            )
    return examples


def split_forget_retain(
    examples: Sequence[QAExample], forget_percent: float = 10, seed: int = 0
) -> tuple[list[QAExample], list[QAExample]]:
    """Split into (forget, retain) by whole people, as TOFU forgets whole authors.

    People are drawn at random (seeded) until the forget set holds at least `forget_percent`
    of the examples, so with few people the forget set is rounded up to whole people (at
    least one). Examples with an empty `person` are treated as a person of their own.
    Both splits keep the input order.
    """
    if not 0 < forget_percent < 100:
        raise ValueError(f"forget_percent must be in (0, 100), got {forget_percent}")
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.person or f"#example-{i}", []).append(i)
    if len(groups) < 2:
        raise ValueError(
            "need facts about at least 2 different people to split forget/retain; "
            f"got {len(groups)} (set QAExample.person, or leave it empty to split per example)"
        )

    target = forget_percent / 100 * len(examples)
    people = list(groups)
    random.Random(seed).shuffle(people)
    forget_ids: set[int] = set()
    for person in people:
        if len(forget_ids) >= target:
            break
        forget_ids.update(groups[person])
    if len(forget_ids) == len(examples):
        raise ValueError(f"forget_percent={forget_percent} would forget every example; lower it or add people")
    forget = [ex for i, ex in enumerate(examples) if i in forget_ids]
    retain = [ex for i, ex in enumerate(examples) if i not in forget_ids]
    return forget, retain


# --------------------------------------------------------------------------------------------
# Real-world facts for model utility
# --------------------------------------------------------------------------------------------

# (question, answer, paraphrased answer, wrong answers): well-established, uncontroversial facts
# that unlearning fictitious people should leave intact.
_WORLD_FACTS = (
    ("What is the capital of France?", "Paris.", "The capital of France is Paris.", ("Lyon.", "Marseille.", "Nice.")),
    ("What is the capital of Japan?", "Tokyo.", "Japan's capital city is Tokyo.", ("Osaka.", "Kyoto.", "Nagoya.")),
    ("What is the capital of Italy?", "Rome.", "Italy's capital is Rome.", ("Milan.", "Naples.", "Turin.")),
    (
        "What is the capital of Canada?",
        "Ottawa.",
        "The capital of Canada is Ottawa.",
        ("Toronto.", "Vancouver.", "Montreal."),
    ),
    (
        "What is the capital of Australia?",
        "Canberra.",
        "Australia's capital is Canberra.",
        ("Sydney.", "Melbourne.", "Perth."),
    ),
    (
        "What is the capital of Egypt?",
        "Cairo.",
        "The capital city of Egypt is Cairo.",
        ("Alexandria.", "Luxor.", "Aswan."),
    ),
    ("What is the capital of Spain?", "Madrid.", "Spain's capital is Madrid.", ("Barcelona.", "Seville.", "Valencia.")),
    (
        "What is the capital of Germany?",
        "Berlin.",
        "The capital of Germany is Berlin.",
        ("Munich.", "Hamburg.", "Frankfurt."),
    ),
    (
        "What is the largest planet in the Solar System?",
        "Jupiter.",
        "The biggest planet in the Solar System is Jupiter.",
        ("Saturn.", "Neptune.", "Earth."),
    ),
    (
        "Which planet is known as the Red Planet?",
        "Mars.",
        "Mars is called the Red Planet.",
        ("Venus.", "Mercury.", "Jupiter."),
    ),
    (
        "Which planet is closest to the Sun?",
        "Mercury.",
        "The planet nearest the Sun is Mercury.",
        ("Venus.", "Mars.", "Earth."),
    ),
    (
        "What star is at the centre of the Solar System?",
        "The Sun.",
        "The Solar System is centred on the Sun.",
        ("Sirius.", "Polaris.", "Betelgeuse."),
    ),
    ("How many days are in a leap year?", "366.", "A leap year has 366 days.", ("365.", "364.", "367.")),
    ("What is the chemical symbol for gold?", "Au.", "Gold's chemical symbol is Au.", ("Ag.", "Gd.", "Go.")),
    ("What is the chemical formula of water?", "H2O.", "Water's formula is H2O.", ("CO2.", "H2O2.", "NaCl.")),
    (
        "Which element has atomic number 1?",
        "Hydrogen.",
        "Atomic number 1 is hydrogen.",
        ("Helium.", "Oxygen.", "Carbon."),
    ),
    (
        "At what temperature in Celsius does water freeze at sea level?",
        "0 degrees Celsius.",
        "Water freezes at zero degrees Celsius.",
        ("10 degrees Celsius.", "-10 degrees Celsius.", "32 degrees Celsius."),
    ),
    (
        "At what temperature in Celsius does water boil at sea level?",
        "100 degrees Celsius.",
        "Water boils at one hundred degrees Celsius.",
        ("90 degrees Celsius.", "120 degrees Celsius.", "80 degrees Celsius."),
    ),
    (
        "Who wrote Romeo and Juliet?",
        "William Shakespeare.",
        "Romeo and Juliet was written by William Shakespeare.",
        ("Charles Dickens.", "Jane Austen.", "Geoffrey Chaucer."),
    ),
    (
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci.",
        "The Mona Lisa was painted by Leonardo da Vinci.",
        ("Michelangelo.", "Raphael.", "Vincent van Gogh."),
    ),
    (
        "Who developed the theory of general relativity?",
        "Albert Einstein.",
        "General relativity was developed by Albert Einstein.",
        ("Isaac Newton.", "Niels Bohr.", "Max Planck."),
    ),
    (
        "Who composed the opera The Magic Flute?",
        "Wolfgang Amadeus Mozart.",
        "The Magic Flute was composed by Wolfgang Amadeus Mozart.",
        ("Ludwig van Beethoven.", "Johann Sebastian Bach.", "Giuseppe Verdi."),
    ),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong.",
        "The first person on the Moon was Neil Armstrong.",
        ("Buzz Aldrin.", "Yuri Gagarin.", "John Glenn."),
    ),
    (
        "What is the largest ocean on Earth?",
        "The Pacific Ocean.",
        "Earth's largest ocean is the Pacific.",
        ("The Atlantic Ocean.", "The Indian Ocean.", "The Arctic Ocean."),
    ),
    (
        "What is the tallest mountain above sea level?",
        "Mount Everest.",
        "The highest mountain above sea level is Mount Everest.",
        ("K2.", "Kilimanjaro.", "Mont Blanc."),
    ),
    (
        "What is the longest river in South America?",
        "The Amazon.",
        "South America's longest river is the Amazon.",
        ("The Parana.", "The Orinoco.", "The Magdalena."),
    ),
    ("On which continent is Kenya?", "Africa.", "Kenya is in Africa.", ("Asia.", "South America.", "Europe.")),
    (
        "In which country are the pyramids of Giza?",
        "Egypt.",
        "The pyramids of Giza are in Egypt.",
        ("Mexico.", "Peru.", "Greece."),
    ),
    (
        "What is the main language spoken in Brazil?",
        "Portuguese.",
        "Most Brazilians speak Portuguese.",
        ("Spanish.", "French.", "Italian."),
    ),
    (
        "What is the currency of Japan?",
        "The yen.",
        "Japan uses the yen as its currency.",
        ("The won.", "The yuan.", "The ringgit."),
    ),
    ("How many legs does a spider have?", "Eight.", "A spider has eight legs.", ("Six.", "Ten.", "Four.")),
    ("How many sides does a hexagon have?", "Six.", "A hexagon has six sides.", ("Five.", "Seven.", "Eight.")),
    ("How many minutes are in an hour?", "Sixty.", "An hour has sixty minutes.", ("Fifty.", "Forty.", "One hundred.")),
    ("What is the square root of 81?", "Nine.", "The square root of 81 is nine.", ("Eight.", "Seven.", "Eleven.")),
    ("What is 12 multiplied by 12?", "144.", "Twelve times twelve is 144.", ("124.", "132.", "156.")),
    (
        "How many bones are in the adult human body?",
        "206.",
        "An adult human skeleton has 206 bones.",
        ("186.", "226.", "256."),
    ),
    (
        "Which organ pumps blood through the human body?",
        "The heart.",
        "Blood is pumped around the body by the heart.",
        ("The liver.", "The lungs.", "The kidneys."),
    ),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        "Carbon dioxide.",
        "For photosynthesis, plants take in carbon dioxide.",
        ("Oxygen.", "Nitrogen.", "Helium."),
    ),
    (
        "What is the largest animal on Earth?",
        "The blue whale.",
        "The biggest animal on Earth is the blue whale.",
        ("The African elephant.", "The giraffe.", "The sperm whale."),
    ),
    (
        "What is the main ingredient of guacamole?",
        "Avocado.",
        "Guacamole is made mainly from avocado.",
        ("Tomato.", "Cucumber.", "Peas."),
    ),
    (
        "How many players does a football team have on the field?",
        "Eleven.",
        "A football side fields eleven players.",
        ("Nine.", "Ten.", "Twelve."),
    ),
)


def world_facts() -> list[QAExample]:
    """Real, uncontroversial general-knowledge QA pairs for measuring model utility."""
    return [QAExample(q, a, p, wrong) for q, a, p, wrong in _WORLD_FACTS]


def make_facts_dataset(
    num_people: int = 20,
    questions_per_person: int = 10,
    forget_percent: float = 10,
    num_perturbed: int = 3,
    seed: int = 0,
) -> FactsDataset:
    """Generate fictitious facts, split them into forget/retain, and add the world facts."""
    facts = make_fictitious_facts(num_people, questions_per_person, num_perturbed, seed)
    forget, retain = split_forget_retain(facts, forget_percent, seed)
    return FactsDataset(forget=forget, retain=retain, world_facts=world_facts())


# --------------------------------------------------------------------------------------------
# Loading user data
# --------------------------------------------------------------------------------------------


def _example_from_record(
    record: Any,
    where: str,
    question_key: str,
    answer_key: str,
    paraphrased_key: str = "paraphrased_answer",
    perturbed_key: str = "perturbed_answers",
    person_key: str = "person",
) -> QAExample:
    """Build a QAExample from one mapping; `where` (file and line, or row) prefixes errors."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object with keys, got {type(record).__name__}")

    def text(key: str, required: bool) -> str | None:
        if key not in record or (record[key] is None and not required):
            if required:
                raise ValueError(
                    f"{where}: missing key {key!r} (available keys: {sorted(map(str, record))}); "
                    f"pass question_key=/answer_key= to name your columns"
                )
            return None
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        return value

    question = text(question_key, required=True)
    answer = text(answer_key, required=True)
    raw = record.get(perturbed_key)
    # TOFU stores a list; a lone string is accepted as a single wrong answer.
    perturbed = () if raw is None else (raw,) if isinstance(raw, str) else raw
    if not (isinstance(perturbed, (list, tuple)) and all(isinstance(p, str) and p.strip() for p in perturbed)):
        raise ValueError(f"{where}: {perturbed_key!r} must be a string or a list of non-empty strings, got {raw!r}")
    return QAExample(
        question=question,
        answer=answer,
        paraphrased_answer=text(paraphrased_key, required=False) or answer,
        perturbed_answers=tuple(perturbed),
        person=text(person_key, required=False) or "",
    )


# The readers below return (where, record) pairs: `where` names the file and line for errors.


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """One JSON value per line; blank lines are skipped."""
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    return records


def _read_json(path: Path) -> list[tuple[str, Any]]:
    """A JSON list of rows, or an object holding that list under "data"."""
    with path.open(encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e.msg}, line {e.lineno}); a .jsonl file needs the .jsonl suffix"
            ) from None
    rows = content.get("data") if isinstance(content, dict) else content
    if not isinstance(rows, list):
        raise ValueError(
            f'{path}: expected a JSON list of rows or an object {{"data": [rows]}}, '
            f"got a {type(content).__name__}" + (f" with keys {list(content)}" if isinstance(content, dict) else "")
        )
    return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]


def _read_csv(
    path: Path, keep: Iterable[str], perturbed_key: str, perturbed_sep: str
) -> tuple[list[str] | None, list[tuple[str, dict[str, Any]]]]:
    """The header (None for an empty file) and the rows of a CSV file.

    Empty cells count as absent so that defaults apply, except in the `keep` columns, where an
    empty cell is reported as such; the perturbed cell is split at `perturbed_sep`.
    """
    keep = set(keep)
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # DictReader fills missing trailing cells with None and names surplus cells None.
        for row in reader:
            record: dict[str, Any] = {k: v for k, v in row.items() if k is not None and (v or k in keep)}
            if record.get(perturbed_key):
                record[perturbed_key] = [p.strip() for p in record[perturbed_key].split(perturbed_sep) if p.strip()]
            records.append((f"{path}, line {reader.line_num}", record))
        return reader.fieldnames, records


def load_qa_jsonl(
    path: str | Path,
    question_key: str = "question",
    answer_key: str = "answer",
    paraphrased_key: str = "paraphrased_answer",
    perturbed_key: str = "perturbed_answers",
    person_key: str = "person",
) -> list[QAExample]:
    """Load one JSON object per line; blank lines are skipped.

    Only the question and answer keys are required. A missing paraphrase defaults to the
    answer and missing perturbed answers to (). For TOFU's own files pass
    `perturbed_key="perturbed_answer"`. :func:`as_examples` reads the same files and also
    recognises prompt/response and chat rows.
    """
    path = Path(path)
    examples = [
        _example_from_record(record, where, question_key, answer_key, paraphrased_key, perturbed_key, person_key)
        for where, record in _read_jsonl(path)
    ]
    if not examples:
        raise ValueError(f"{path}: no examples found (the file is empty)")
    return examples


def load_qa_csv(
    path: str | Path,
    question_key: str = "question",
    answer_key: str = "answer",
    paraphrased_key: str = "paraphrased_answer",
    perturbed_key: str = "perturbed_answers",
    person_key: str = "person",
    perturbed_sep: str = "|",
) -> list[QAExample]:
    """Load a CSV file with a header row naming the columns.

    CSV cells hold one string, so several perturbed answers share one cell, separated by
    `perturbed_sep`. Empty optional cells count as absent.
    """
    path = Path(path)
    header, records = _read_csv(path, (question_key, answer_key), perturbed_key, perturbed_sep)
    if header is None:
        raise ValueError(f"{path}: no examples found (the file is empty)")
    for column in (question_key, answer_key):
        if column not in header:
            raise ValueError(
                f"{path}: header has no column {column!r} (columns: {header}); "
                f"pass question_key=/answer_key= to name your columns"
            )
    if not records:
        raise ValueError(f"{path}: no examples found (only a header row)")
    return [
        _example_from_record(record, where, question_key, answer_key, paraphrased_key, perturbed_key, person_key)
        for where, record in records
    ]


ACCEPTED_FORMS = (
    "a QAExample or a (question, answer) pair of strings, or a row with keys {question, answer}, "
    "{prompt, response} or {messages: [...]} (chat)"
)
"""What one example may be, as every method and the CLI accept it (see :func:`as_examples`);
error messages quote it."""

_FILE_SUFFIXES = (".json", ".jsonl", ".csv")
_QA_KEYS = (("question", "answer"), ("prompt", "response"))


def _chat_record(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A chat row as a question/answer record: the last assistant turn answers the last user turn
    before it; system turns and earlier exchanges are context this format cannot keep."""
    messages = row["messages"]
    if not (
        isinstance(messages, Sequence)
        and not isinstance(messages, str)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages)
    ):
        raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} turns, got {messages!r}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError(
            f"{where}: the chat has no assistant turn (roles: {roles}); the answer to unlearn "
            "is the last assistant turn"
        )
    last_answer = len(roles) - 1 - roles[::-1].index("assistant")
    if "user" not in roles[:last_answer]:
        raise ValueError(f"{where}: no user turn before the last assistant turn (roles: {roles})")
    last_question = last_answer - 1 - roles[last_answer - 1 :: -1].index("user")
    # Other keys (paraphrased_answer, perturbed_answers, person) stay, as in question/answer rows.
    extra = {k: v for k, v in row.items() if k not in ("messages", "question", "answer")}
    return {**extra, "question": messages[last_question]["content"], "answer": messages[last_answer]["content"]}


def _as_example(item: Any, where: str) -> QAExample:
    if isinstance(item, QAExample):
        record: Mapping[str, Any] = {"question": item.question, "answer": item.answer}
        _example_from_record(record, where, "question", "answer")  # just the checks: keep `item` as it is
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item):
        return _example_from_record({"question": item[0], "answer": item[1]}, where, "question", "answer")
    if not isinstance(item, Mapping):
        raise TypeError(f"{where} must be {ACCEPTED_FORMS}; got {item!r}")
    if "messages" in item:
        return _example_from_record(_chat_record(item, where), where, "question", "answer")
    for question_key, answer_key in _QA_KEYS:
        if question_key in item and answer_key in item:
            return _example_from_record(item, where, question_key, answer_key)
    raise TypeError(f"{where} has keys {list(map(str, item))}; expected {ACCEPTED_FORMS}")


def _as_path(data: Any) -> Path | None:
    """`data` as a file path, or None: any os.PathLike, or a str naming a file or ending in a data suffix."""
    if isinstance(data, os.PathLike):
        return Path(data)
    if isinstance(data, str) and (data.lower().endswith(_FILE_SUFFIXES) or os.path.isfile(data)):
        return Path(data)
    return None


def _records_of_file(path: Path, what: str) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is not a file" + (" (it is a directory)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        keep = {key for pair in _QA_KEYS for key in pair}
        header, records = _read_csv(path, keep, "perturbed_answers", "|")
        if header is not None and not any(set(pair) <= set(header) for pair in _QA_KEYS):
            raise ValueError(
                f"{what}: {path}: the header has columns {header}; expected question,answer or "
                "prompt,response (plus optional paraphrased_answer, perturbed_answers (|-separated), "
                "person)"
            )
        return records
    raise ValueError(
        f"{what}: {path} has suffix {path.suffix!r}; expected one of {', '.join(_FILE_SUFFIXES)} "
        "(or load it yourself and pass the rows)"
    )


def as_examples(data: Any, what: str = "examples") -> list[QAExample]:
    """The examples in ``data``, whatever form it comes in: the one data entry point.

    ``data`` is a list (any iterable) whose items are each :data:`ACCEPTED_FORMS`; a Hugging Face
    ``datasets.Dataset`` of such rows; or a path to a ``.json`` (a list of rows, or ``{"data": [...]}``),
    ``.jsonl`` or ``.csv`` file of them. Rows keep their optional ``paraphrased_answer``,
    ``perturbed_answers`` and ``person``. A chat row's question is the last user turn before its last
    assistant turn, its answer that assistant turn. ``what`` names the data in error messages.
    Empty data gives [] (the caller decides whether that is an error).
    """
    path = _as_path(data)
    if path is not None:
        return [_as_example(record, f"{what}: {where}") for where, record in _records_of_file(path, what)]
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{what} must be a list of QAExample, pairs or rows (each {ACCEPTED_FORMS}), a datasets.Dataset of "
            f"such rows, or a path to a .json, .jsonl or .csv file; got {_describe(data)}"
        )
    # A datasets.Dataset iterates its rows as dicts, so it needs no import of `datasets` here.
    return [_as_example(item, f"{what}[{i}]") for i, item in enumerate(data)]


def _describe(data: Any) -> str:
    """The type of `data` for an error message, with a hint for the likely mistakes."""
    name = type(data).__name__
    if isinstance(data, str):
        return f"a str that is no path to an existing file: {data[:60]!r}"
    # A DatasetDict (a dict of Datasets, duck-typed to keep `datasets` optional) holds splits, not rows.
    if isinstance(data, Mapping) and data and all(hasattr(v, "column_names") for v in data.values()):
        return f"a {name} of splits {list(data)}: pick one, e.g. data[{next(iter(data))!r}]"
    return f"a {name}"


def check_examples(examples: Any, what: str) -> list[QAExample]:
    """:func:`as_examples`, and an error if there are none (``what`` names the data in messages)."""
    examples = as_examples(examples, what)
    if not examples:
        raise ValueError(f"{what} is empty: pass at least one example")
    return examples


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def _has_chat_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def encode_prompt(tokenizer: Any, question: str) -> list[int]:
    """Token ids of the prompt that asks `question`, ending where the answer should start.

    With a chat template: the user turn plus the assistant header. Otherwise the plain
    "Question: ...\\nAnswer:" format (the answer then starts with a space, which BPE
    tokenisers attach to its first word).
    """
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        # The rendered template already contains its special tokens.
        return tokenizer.encode(text, add_special_tokens=False)
    # Let the tokenizer add its own prefix (e.g. BOS) as it would for any plain text.
    return tokenizer.encode(f"Question: {question}\nAnswer:", add_special_tokens=True)


def encode_qa(tokenizer: Any, example: QAExample | tuple[str, str], max_length: int = 256) -> dict[str, Any]:
    """Tokenise a question and its answer for causal-LM training with loss on the answer only.

    Prompt and answer are tokenised separately so the boundary is exact; the answer is
    followed by EOS so the model learns to stop. If the result is longer than `max_length`,
    the answer is cut at the end (losing EOS); the prompt is never cut.

    Returns `input_ids`, `labels` (same length, -100 on the prompt; the model shifts them) and
    `prompt_length`.
    """
    question, answer = (example.question, example.answer) if isinstance(example, QAExample) else example
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set tokenizer.eos_token before encoding")
    prompt_ids = encode_prompt(tokenizer, question)
    # Chat templates put the answer right after the assistant header; the plain format after
    # "Answer:", hence the space.
    answer_text = answer if _has_chat_template(tokenizer) else f" {answer}"
    answer_ids = tokenizer.encode(answer_text, add_special_tokens=False) + [tokenizer.eos_token_id]

    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt is {len(prompt_ids)} tokens, leaving no room for the answer within "
            f"max_length={max_length}; increase max_length or shorten the question: {question!r}"
        )
    answer_ids = answer_ids[:room]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "prompt_length": len(prompt_ids),
    }


def pad_token_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (padding is masked, so any id works)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token nor eos_token; set one of them")
    return pad


def collate(encoded: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into `input_ids`, `attention_mask` and `labels` [B, S].

    Padding positions get attention 0 and label -100, so they affect neither attention nor loss.
    """
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class QADataset(torch.utils.data.Dataset):
    """Examples tokenised once up front; use `dataset.collate` as a DataLoader's collate_fn."""

    def __init__(self, tokenizer: Any, examples: Sequence[QAExample | tuple[str, str]], max_length: int = 256) -> None:
        self.encoded = [encode_qa(tokenizer, ex, max_length) for ex in examples]
        self.pad_token_id = pad_token_id_of(tokenizer)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.encoded[index]

    def collate(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)


def make_batches(
    tokenizer: Any,
    examples: Sequence[QAExample | tuple[str, str]],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    max_length: int = 256,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield one pass of collated batches; the last one may be smaller.

    Shuffling uses its own seeded generator, so the order is reproducible. For several
    epochs, build a `QADataset` once instead of re-tokenising each pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = QADataset(tokenizer, examples, max_length)
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield dataset.collate([dataset[i] for i in order[start : start + batch_size]])


def _is_batch(item: Any) -> bool:
    # A collated batch holds tensors; a question/answer row holds strings.
    return isinstance(item, Mapping) and (
        any(key in item for key in ("input_ids", "labels", "attention_mask"))
        or any(isinstance(v, torch.Tensor) for v in item.values())
    )


def as_batches(
    data: Any, *, tokenizer: Any, batch_size: int, max_length: int, what: str
) -> list[dict[str, torch.Tensor]]:
    """``data`` as a list of collated batches, for the methods' training loops.

    Already-collated batches (mappings of tensors ``input_ids`` and ``labels`` [batch, sequence],
    e.g. from :func:`collate`) are checked and returned as given. Anything else goes through
    :func:`as_examples` (every form of :data:`ACCEPTED_FORMS`, a dataset or a file), is encoded with
    ``tokenizer`` and collated in order, ``batch_size`` examples a batch. Empty data gives [].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if _as_path(data) is None:
        if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                f"{what} must be a list of examples or of batches, or a path to a .json, .jsonl or "
                f".csv file; got {_describe(data)}"
            )
        data = list(data)
        kinds = {_is_batch(d) for d in data}
        if kinds == {True}:
            for d in data:
                if "input_ids" not in d or "labels" not in d:
                    raise ValueError(f"{what} batches need 'input_ids' and 'labels' (from unlearn_fast.data.collate)")
                if not (isinstance(d["input_ids"], torch.Tensor) and isinstance(d["labels"], torch.Tensor)):
                    raise TypeError(
                        f"{what} batch: input_ids and labels must be tensors, got "
                        f"{type(d['input_ids']).__name__} and {type(d['labels']).__name__}"
                    )
                if d["input_ids"].shape != d["labels"].shape:
                    raise ValueError(
                        f"{what} batch: input_ids {tuple(d['input_ids'].shape)} and labels "
                        f"{tuple(d['labels'].shape)} must have one shape [batch, sequence]"
                    )
            return data
        if len(kinds) > 1:
            raise TypeError(
                f"{what} mixes collated batches (dicts of tensors) and question/answer examples; pass one kind"
            )
    examples = as_examples(data, what)
    if not examples:
        return []
    if tokenizer is None:
        raise ValueError(f"{what} holds question/answer examples: pass tokenizer= to encode them")
    dataset = QADataset(tokenizer, examples, max_length=max_length)
    return [
        dataset.collate(dataset.encoded[start : start + batch_size]) for start in range(0, len(dataset), batch_size)
    ]


# --------------------------------------------------------------------------------------------
# Offline text domains (the specialised MoE's experts train on them)
# --------------------------------------------------------------------------------------------

TEXT_DOMAINS = ("python", "prose")
_CHUNKS_PER_FILE = 4
_NOT_PROSE = ("licen", "copying", "notice", "authors", "requirements", "entry_points", "top_level", "record")


def _stable_order(items: Iterable[str], seed: int) -> list[str]:
    """``items`` in an order fixed by their text and ``seed`` (no RNG, no file-system order)."""
    import hashlib

    return sorted(items, key=lambda s: hashlib.sha1(f"{seed}\0{s}".encode()).hexdigest())


def _python_chunks(chars: int) -> Iterator[tuple[str, str]]:
    """(file, chunk) of standard-library modules: ``chars``-character windows of code, from the first ``def``/``class``."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2] or path.parts[-2] in ("site-packages", "idlelib", "encodings"):  # codec tables
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        start = min((i for i in (text.find("\ndef "), text.find("\nclass ")) if i >= 0), default=-1)
        for first in range(start + 1, len(text) - chars, 4 * chars) if start >= 0 else ():
            yield str(path.relative_to(root)), text[first : first + chars]


def _prose_chunks(chars: int) -> Iterator[tuple[str, str]]:
    """(file, paragraph) of English prose in installed packages' documentation: package descriptions
    (``*.dist-info/METADATA``), README/.md/.rst/.txt files in site-packages and /usr/share/doc. A
    paragraph counts if it is long (>= ``chars``), ~all letters and spaces, and not markup or licence text."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["purelib"]), Path("/usr/share/doc")]
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                lower = name.lower()
                if not (lower == "metadata" or lower.endswith((".md", ".rst", ".txt"))) or any(
                    w in lower for w in _NOT_PROSE
                ):
                    continue
                path = Path(dirpath) / name
                if path.stat().st_size > 500_000:
                    continue
                for paragraph in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
                    text = " ".join(paragraph.split())
                    chunk = text[:chars].rsplit(" ", 1)[0]
                    letters = sum(c.isalpha() or c == " " for c in chunk)
                    if len(text) >= chars and letters >= 0.93 * len(chunk) and text[0].isupper() and "://" not in text:
                        yield str(path), chunk


def domain_texts(domain: str, count: int, *, chars: int = 300, seed: int = 0) -> list[str]:
    """``count`` distinct text chunks of about ``chars`` characters of an offline ``domain``:
    ``"python"`` (code from the standard library's modules) or ``"prose"``
    (English paragraphs from the documentation shipped with installed packages).

    Deterministic on a given installation (chosen by a hash of the text and ``seed``, not by RNG or
    directory order); another Python or other packages give other chunks, so callers that cache
    results key them by the texts. Raises if the installation has fewer than ``count``.
    """
    if domain not in TEXT_DOMAINS:
        raise ValueError(f"domain must be one of {TEXT_DOMAINS}, got {domain!r}")
    if count < 1 or chars < 20:
        raise ValueError(f"need count >= 1 and chars >= 20, got count={count}, chars={chars}")
    chunks = _python_chunks(chars) if domain == "python" else _prose_chunks(chars)
    # At most a few chunks per file, so no file dominates; then a hash order independent of the walk.
    per_file: dict[str, list[str]] = {}
    for source, text in chunks:
        if len(kept := per_file.setdefault(source, [])) < _CHUNKS_PER_FILE:
            kept.append(text)
    texts = _stable_order({t for kept in per_file.values() for t in kept}, seed)
    if len(texts) < count:
        raise ValueError(
            f"domain_texts: only {len(texts)} {domain} chunks of {chars} characters are installed here, "
            f"{count} asked; ask for fewer or shorter ones"
        )
    return texts[:count]
