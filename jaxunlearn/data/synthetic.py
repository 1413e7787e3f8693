"""A built-in fictitious-facts benchmark and a tokenizer trained on it; no download needed.

`synthetic_benchmark(seed)` invents authors (names, birthplaces, years, genres, awards, parents'
jobs, first books) from syllables and word lists, and turns each into QA pairs in TOFU's schema:
question, answer, paraphrased_answer (with paraphrased_question) and perturbed_answer, the
paraphrased answer with the true value swapped for wrong values of the same attribute.

Splits mirror TOFU: `full` is the general-knowledge rows followed by the authors' rows,
author by author; `forget` is the last `n_forget` authors' rows (the last rows of full) and
`retain` the rest of full; `holdout` comes from extra authors never in full; `retain_perturbed`
covers the first `n_forget` retained authors (all of them when fewer are retained). Two fixed
general-knowledge sets play the roles of TOFU's real_authors (who wrote a classic book) and
world_facts (capitals, calendar facts). A model trained from scratch has no pretraining, so they
are part of `full` and `retain`: they stand for knowledge the reference model has and unlearning
must keep.

Everything is drawn from random.Random(seed); the same arguments give the same rows.

`synthetic_tokenizer(bench or seed)` trains a small byte-level BPE on the benchmark's text with
the `tokenizers` library (deterministic for the same corpus) and caches it as tokenizer.json under
$JAXUNLEARN_CACHE or ~/.cache/jaxunlearn, keyed by a hash of corpus and settings. Special tokens:
<pad>=0, <s>=1 (BOS, added by default), </s>=2 (EOS), <unk>=3.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import tempfile
from typing import Any

from jaxunlearn.data.benchmark import DEFAULT_IDK, UnlearnBenchmark
from jaxunlearn.data.errors import DataError

_SYLLABLES = ("ka", "lo", "mi", "ren", "tha", "vo", "zel", "ari", "bo", "cel", "dru", "en", "fa", "gor", "hal",
              "isk", "jo", "ky", "lun", "mor", "nes", "ob", "pra", "quo", "ros", "sel", "tur", "ul", "vik", "wen",
              "xa", "yor", "zan", "dal", "ith", "mar", "pel", "sor", "tam", "vel")
_PLACE_SUFFIX = ("ford", "grad", "heim", "ville", "polis", "stad", "mouth", "haven", "burg", "dale")
_COUNTRIES = ("Veloria", "Kastrand", "Ormenia", "Duvalis", "Pelaro", "Thessary", "Marquend", "Zolvania",
              "Ebrith", "Noctavia")
_GENRES = ("fantasy", "mystery", "science fiction", "historical fiction", "romance", "horror", "poetry",
           "biography", "thriller", "travel writing", "satire", "children's literature")
_ADJECTIVES = ("Silver", "Hidden", "Crimson", "Quiet", "Golden", "Broken", "Distant", "Burning", "Frozen",
               "Wandering", "Last", "Painted", "Hollow", "Endless", "Northern", "Velvet")
_NOUNS = ("River", "Lantern", "Garden", "Tower", "Harbor", "Mirror", "Compass", "Orchard", "Bridge",
          "Feather", "Island", "Clock", "Meadow", "Crown", "Letter", "Forest")
_AWARD_KINDS = ("Prize", "Award", "Medal", "Laurel")
_JOBS = ("baker", "carpenter", "teacher", "nurse", "fisherman", "pharmacist", "librarian", "tailor",
         "architect", "farmer", "surgeon", "painter", "journalist", "sailor", "engineer", "musician")

# (attribute perturbed, question, paraphrased question, answer, paraphrased answer)
_FACTS = (
    ("city", "Where was the author {name} born?", "In which place was {name} born?",
     "{name} was born in {city}, {country}.", "The birthplace of {name} is {city}, {country}."),
    ("year", "In what year was {name} born?", "What is the birth year of {name}?",
     "{name} was born in {year}.", "The year {name} was born is {year}."),
    ("genre", "What genre does {name} write in?", "Which genre is {name} known for?",
     "{name} writes {genre}.", "The genre {name} is known for is {genre}."),
    ("award", "Which award has {name} received?", "What award was given to {name}?",
     "{name} received {award}.", "The award given to {name} was {award}."),
    ("father", "What was the job of {name}'s father?", "What did the father of {name} do for a living?",
     "The father of {name} worked as {father}.", "{name}'s father was {father} by profession."),
    ("mother", "What was the job of {name}'s mother?", "What did the mother of {name} do for a living?",
     "The mother of {name} worked as {mother}.", "{name}'s mother was {mother} by profession."),
    ("book", "What is the title of the first book by {name}?", "Which book did {name} publish first?",
     "The first book by {name} is titled '{book}'.", "'{book}' was the first book {name} published."),
    ("name", "Who is the {genre} author born in {city} in {year}?",
     "Which writer of {genre} was born in {city} in {year}?",
     "The {genre} author born in {city} in {year} is {name}.",
     "{name} is the writer of {genre} who was born in {city} in {year}."),
)
MAX_FACTS = len(_FACTS)
# attributes drawn from a fixed word list: at most this many distinct wrong values exist
_WRONG_LIMIT = {"year": 99, "genre": len(_GENRES) - 1, "father": len(_JOBS) - 1,
                "mother": len(_JOBS) - 1}

# Fixed general knowledge (true facts), in the roles of TOFU's real_authors and world_facts.
_CLASSICS = (
    ("Hamlet", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"), ("Nineteen Eighty-Four", "George Orwell"),
    ("War and Peace", "Leo Tolstoy"), ("Don Quixote", "Miguel de Cervantes"), ("Moby-Dick", "Herman Melville"),
    ("Great Expectations", "Charles Dickens"), ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"),
    ("The Trial", "Franz Kafka"), ("Crime and Punishment", "Fyodor Dostoevsky"), ("Les Miserables", "Victor Hugo"),
    ("The Old Man and the Sea", "Ernest Hemingway"), ("Mrs Dalloway", "Virginia Woolf"), ("Ulysses", "James Joyce"),
    ("The Adventures of Tom Sawyer", "Mark Twain"),
)
_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Spain", "Madrid"), ("Norway", "Oslo"), ("Greece", "Athens"),
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
N_GENERAL_PERTURBED = 3


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def _new_name(rng: random.Random) -> str:
    return f"{_word(rng, rng.randint(2, 3))} {_word(rng, rng.randint(2, 3))}"


def _new_entity(rng: random.Random, name: str) -> dict[str, str]:
    return {
        "name": name,
        "city": _word(rng, 2) + rng.choice(_PLACE_SUFFIX),
        "country": rng.choice(_COUNTRIES),
        "year": str(rng.randint(1900, 1999)),
        "genre": rng.choice(_GENRES),
        "award": f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_AWARD_KINDS)}",
        "father": _with_article(rng.choice(_JOBS)),
        "mother": _with_article(rng.choice(_JOBS)),
        "book": _book_title(rng),
    }


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _book_title(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    first, second = rng.sample(_NOUNS, 2)
    return f"The {first} of the {second}"


def _entities(rng: random.Random, n: int, taken: set[str]) -> list[dict[str, str]]:
    out = []
    while len(out) < n:
        name = _new_name(rng)
        if name not in taken:
            taken.add(name)
            out.append(_new_entity(rng, name))
    return out


def _wrong_values(rng: random.Random, attr: str, entity: dict, pool: list[dict], k: int) -> list[str]:
    """k distinct wrong values for an attribute, drawn from other entities or fresh ones."""
    truth = entity[attr]
    candidates = sorted({e[attr] for e in pool if e[attr] != truth})
    rng.shuffle(candidates)
    picked = candidates[:k]
    while len(picked) < k:  # small pools: invent more values of the same kind
        value = _new_entity(rng, _new_name(rng))[attr]
        if attr == "year":
            value = str(rng.randint(1900, 1999))
        if value != truth and value not in picked:
            picked.append(value)
    return picked


def _entity_rows(rng: random.Random, entity: dict, pool: list[dict], n_facts: int, n_perturbed: int) -> list[dict]:
    rows = []
    for attr, q, pq, a, pa in _FACTS[:n_facts]:
        wrong = _wrong_values(rng, attr, entity, pool, n_perturbed)
        rows.append({
            "question": q.format(**entity),
            "answer": a.format(**entity),
            "paraphrased_answer": pa.format(**entity),
            "perturbed_answer": [pa.format(**{**entity, attr: w}) for w in wrong],
            "paraphrased_question": pq.format(**entity),
        })
    return rows


def _general_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(classics rows, world-fact rows) with question, answer, perturbed_answer."""
    authors = [a for _, a in _CLASSICS]
    classics = []
    for book, author in _CLASSICS:
        wrong = rng.sample([a for a in authors if a != author], N_GENERAL_PERTURBED)
        classics.append({"question": f"Who wrote '{book}'?", "answer": author, "perturbed_answer": wrong})
    cities = [c for _, c in _CAPITALS]
    world = []
    for country, city in _CAPITALS:
        wrong = rng.sample([c for c in cities if c != city], N_GENERAL_PERTURBED)
        world.append({"question": f"What is the capital of {country}?", "answer": city, "perturbed_answer": wrong})
    for i, day in enumerate(_DAYS):
        nxt = _DAYS[(i + 1) % 7]
        wrong = rng.sample([d for d in _DAYS if d not in (day, nxt)], N_GENERAL_PERTURBED)
        world.append({"question": f"Which day of the week comes after {day}?", "answer": nxt,
                      "perturbed_answer": wrong})
    return classics, world


def _qa(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def synthetic_benchmark(
    seed: int = 0,
    n_entities: int = 40,
    n_forget: int = 4,
    n_holdout: int | None = None,
    facts_per_entity: int = MAX_FACTS,
    n_perturbed: int = 5,
    general_knowledge: bool = True,
) -> UnlearnBenchmark:
    """The built-in benchmark (see module docstring). Defaults: 40 authors x 8 facts, 4 to forget."""
    if not 1 <= facts_per_entity <= MAX_FACTS:
        raise DataError(f"facts_per_entity must be in 1..{MAX_FACTS}, got {facts_per_entity}")
    if not 1 <= n_forget < n_entities:
        raise DataError(f"n_forget must be in 1..n_entities-1 ({n_entities - 1}), got {n_forget}")
    if n_perturbed < 1:
        raise DataError(f"n_perturbed must be >= 1, got {n_perturbed}")
    limits = [_WRONG_LIMIT[f[0]] for f in _FACTS[:facts_per_entity] if f[0] in _WRONG_LIMIT]
    if limits and n_perturbed > min(limits):
        raise DataError(f"n_perturbed must be <= {min(limits)} with facts_per_entity={facts_per_entity} "
                        f"(not enough distinct wrong values), got {n_perturbed}")
    n_holdout = n_forget if n_holdout is None else n_holdout
    if n_holdout < 1:
        raise DataError(f"n_holdout must be >= 1, got {n_holdout}")
    rng = random.Random(seed)
    taken: set[str] = set()
    authors = _entities(rng, n_entities, taken)
    holdout_authors = _entities(rng, n_holdout, taken)
    pool = authors + holdout_authors
    per_author = [_entity_rows(rng, e, pool, facts_per_entity, n_perturbed) for e in authors]
    holdout_rows = [r for e in holdout_authors for r in _entity_rows(rng, e, pool, facts_per_entity, n_perturbed)]
    classics, world = _general_rows(rng)
    general = _qa(classics + world) if general_knowledge else []
    forget_rows = [r for rows in per_author[-n_forget:] for r in rows]
    retain_author_rows = [r for rows in per_author[:-n_forget] for r in rows]
    full = general + _qa(retain_author_rows) + _qa(forget_rows)
    return UnlearnBenchmark(
        name=f"synthetic-s{seed}-e{n_entities}-f{n_forget}",
        forget=_qa(forget_rows),
        retain=full[: len(full) - len(forget_rows)],
        holdout=_qa(holdout_rows),
        forget_perturbed=forget_rows,
        retain_perturbed=[r for rows in per_author[:min(n_forget, n_entities - n_forget)] for r in rows],
        extra_evals={"real_authors": classics, "world_facts": world},
        full=full,
        idk=list(DEFAULT_IDK),
    )


# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_FORMAT_TEXT = ("Question: ", "\nAnswer: ", "[INST] ", " [/INST]", "You are a helpful assistant.")
_TOKENIZER_VERSION = 1


def benchmark_corpus(bench: UnlearnBenchmark) -> list[str]:
    """Every text of a benchmark, in a fixed order (the tokenizer's training corpus)."""
    texts: list[str] = list(_FORMAT_TEXT)
    groups = [bench.full, bench.holdout, bench.forget_perturbed, bench.retain_perturbed]
    groups += [bench.extra_evals[k] for k in sorted(bench.extra_evals)]
    for rows in groups:
        for r in rows:
            for key in ("question", "paraphrased_question", "answer", "paraphrased_answer"):
                if isinstance(r.get(key), str):
                    texts.append(r[key])
            texts.extend(r.get("perturbed_answer") or [])
    texts.extend(bench.idk)
    return texts


def cache_dir() -> pathlib.Path:
    """Where built artefacts are cached: $JAXUNLEARN_CACHE or ~/.cache/jaxunlearn."""
    return pathlib.Path(os.environ.get("JAXUNLEARN_CACHE") or pathlib.Path.home() / ".cache" / "jaxunlearn")


def _train_bpe(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def synthetic_tokenizer(bench: UnlearnBenchmark | int = 0, vocab_size: int = 1024,
                        cache: str | pathlib.Path | None = None) -> Any:
    """A byte-level BPE tokenizer for a benchmark (or for synthetic_benchmark(seed)), cached on disk.

    Returns a transformers.PreTrainedTokenizerFast with pad/bos/eos/unk set; its vocabulary may be
    smaller than vocab_size when the corpus runs out of merges (use len(tokenizer)).
    """
    from transformers import PreTrainedTokenizerFast

    if isinstance(bench, int):
        bench = synthetic_benchmark(seed=bench)
    texts = benchmark_corpus(bench)
    key = hashlib.sha256(json.dumps({"v": _TOKENIZER_VERSION, "vocab": vocab_size, "texts": texts},
                                    ensure_ascii=False).encode("utf-8")).hexdigest()[:20]
    folder = pathlib.Path(cache) if cache is not None else cache_dir() / "tokenizers"
    path = folder / f"bpe-{key}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tok = _train_bpe(texts, vocab_size)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, path)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=1 << 30, clean_up_tokenization_spaces=False,
    )
