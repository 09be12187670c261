"""Generate the mvquant task suite (seeded, offline): `python evals/generate.py [--check]`.

Writes evals/data/<task>.jsonl. Multiple-choice rows: {"id", "context", "choices", "answer"}
(answer = index of the right choice; lm-eval puts one space between context and choice).
Greedy rows (passkey): {"id", "context", "target"}: correct when greedy decoding would produce
" " + target. `--check` regenerates in memory and fails if a shipped file differs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import facts  # noqa: E402

DATA_DIR = HERE / "data"
N_ITEMS = 200

# -- contextual -------------------------------------------------------------------------------------
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_TOKENS = 22     # tokens of one filler with the SmolLM2 tokenizer (measured); sizes the prompts
# name: (approximate prompt tokens, digits in the key, items). passkey_512 has 100 items: its ~55k
# prompt tokens per run would otherwise be a third of the suite's time on a 2-core CPU.
PASSKEY = {"passkey_128": (128, 6, N_ITEMS), "passkey_256": (256, 12, N_ITEMS), "passkey_512": (512, 24, 100)}


def passkey(rng: random.Random, tokens: int, digits: int, n: int = N_ITEMS) -> list[dict]:
    # intro ~30 tokens, needle ~2 x digits + 12, question ~12
    fillers = max(2, round((tokens - 54 - 2 * digits) / FILLER_TOKENS))
    rows = []
    for i in range(n):
        key = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))
        before = rng.randint(1, fillers - 1)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        text = (PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (fillers - before)
                + "\nWhat is the pass key? The pass key is")
        rows.append({"id": i, "context": text, "target": key, "depth": round(before / fillers, 3)})
    return rows


KV_WORDS = ["apple", "river", "candle", "forest", "window", "tiger", "garden", "mirror", "rocket", "violin",
            "pencil", "island", "ladder", "castle", "bottle", "cloud", "engine", "feather", "hammer", "lemon",
            "marble", "needle", "ocean", "pillow", "saddle", "tunnel", "wallet", "anchor", "basket", "cactus"]


def kv_retrieval(rng: random.Random, n: int = N_ITEMS, pairs: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        words = rng.sample(KV_WORDS, pairs)
        codes = rng.sample(range(1000, 10000), pairs)
        lines = "\n".join(f"The code for {w} is {c}." for w, c in zip(words, codes))
        q = rng.randrange(pairs)
        others = rng.sample([c for j, c in enumerate(codes) if j != q], 3)
        choices = [str(c) for c in others] + [str(codes[q])]
        rng.shuffle(choices)
        text = (f"Here is a list of secret codes.\n{lines}\nQuestion: What is the code for {words[q]}?\n"
                f"Answer: The code for {words[q]} is")
        rows.append({"id": i, "context": text, "choices": choices, "answer": choices.index(str(codes[q]))})
    return rows


NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Karen", "Leo",
         "Maria", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Yusuf", "Zoe", "Omar"]
MF_RELATIONS = [
    ("lives in", "Where does {name} live?\nAnswer: {name} lives in",
     ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Denver", "Madrid", "Sydney", "Boston", "Dublin"]),
    ("works as a", "What is {name}'s job?\nAnswer: {name} works as a",
     ["teacher", "doctor", "pilot", "baker", "farmer", "painter", "nurse", "lawyer", "chef", "driver"]),
    ("has a pet", "What pet does {name} have?\nAnswer: {name} has a pet",
     ["dog", "cat", "parrot", "rabbit", "turtle", "goldfish", "hamster", "snake", "horse", "goat"]),
    ("likes the color", "Which color does {name} like?\nAnswer: {name} likes the color",
     ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]),
]


def multifact(rng: random.Random, n: int = N_ITEMS, people: int = 4) -> list[dict]:
    """Bind facts to people; every choice appears in the context, so copying alone gives chance (1/4)."""
    rows = []
    for i in range(n):
        rel, question, values = MF_RELATIONS[i % len(MF_RELATIONS)]
        names = rng.sample(NAMES, people)
        vals = rng.sample(values, people)
        facts_text = "\n".join(f"{nm} {rel} {v}." for nm, v in zip(names, vals))
        q = rng.randrange(people)
        choices = list(vals)
        rng.shuffle(choices)
        text = f"Here are some facts about people.\n{facts_text}\nQuestion: {question.format(name=names[q])}"
        rows.append({"id": i, "context": text, "choices": choices, "answer": choices.index(vals[q]),
                     "relation": rel})
    return rows


PLACES = ["library", "park", "museum", "beach", "market", "station", "bakery", "stadium", "zoo", "harbor"]
ITEMS = ["a red umbrella", "a map", "a blue kite", "a camera", "a basket of pears", "a small radio",
         "a wooden box", "a green scarf", "a violin", "a loaf of bread"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TRANSPORT = ["bus", "train", "bicycle", "boat", "tram", "taxi"]


def reading_qa(rng: random.Random, n: int = N_ITEMS) -> list[dict]:
    """Short stories with two characters; the question is about one of them, and both characters'
    answers are among the choices (the right one needs the binding, not just recall of the text)."""
    rows = []
    kinds = ["place", "item", "transport", "day"]
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        pa, pb = rng.sample(PLACES, 2)
        ia, ib = rng.sample(ITEMS, 2)
        ta, tb = rng.sample(TRANSPORT, 2)
        day = rng.choice(DAYS)
        story = (f"On {day}, {a} and {b} left home early. {a} took the {ta} to the {pa}, and {b} took the "
                 f"{tb} to the {pb}. At the {pa}, {a} found {ia}. At the {pb}, {b} bought {ib}. "
                 f"In the evening they met for dinner and talked about their day.")
        kind = kinds[i % len(kinds)]
        who = rng.choice([a, b])
        first = who == a
        if kind == "place":
            question, prefix = f"Where did {who} go?", f"{who} went to the"
            right, wrong, pool = (pa, pb, PLACES) if first else (pb, pa, PLACES)
        elif kind == "item":
            question, prefix = f"What did {who} get at the {pa if first else pb}?", f"{who} got"
            right, wrong, pool = (ia, ib, ITEMS) if first else (ib, ia, ITEMS)
        elif kind == "transport":
            question, prefix = f"How did {who} travel?", f"{who} took the"
            right, wrong, pool = (ta, tb, TRANSPORT) if first else (tb, ta, TRANSPORT)
        else:
            question, prefix = "On which day did this happen?", "It happened on"
            right = day
            wrong = rng.choice([d for d in DAYS if d != day])
            pool = DAYS
        extra = rng.sample([x for x in pool if x not in (right, wrong)], 2)
        choices = [right, wrong] + extra
        rng.shuffle(choices)
        text = f"{story}\nQuestion: {question}\nAnswer: {prefix}"
        rows.append({"id": i, "context": text, "choices": choices, "answer": choices.index(right),
                     "kind": kind})
    return rows


def knowledge_conflict(rng: random.Random, n: int = N_ITEMS) -> list[dict]:
    """The context states a counterfactual; correct = following the context over memory (chance 1/2)."""
    pools = []
    for country, (capital, _cont, language, _cur) in facts.COUNTRIES.items():
        pools.append(("capital", country, capital))
        pools.append(("language", country, language))
    capitals = sorted({v for k, _, v in pools if k == "capital"})
    languages = sorted({v for k, _, v in pools if k == "language"})
    chosen = rng.sample(pools, n) if n <= len(pools) else [rng.choice(pools) for _ in range(n)]
    rows = []
    for i, (kind, country, real) in enumerate(chosen):
        fake = rng.choice([c for c in (capitals if kind == "capital" else languages) if c != real])
        if kind == "capital":
            text = (f"Read the passage and answer from it.\nPassage: In this story, the capital of {country} is "
                    f"{fake}. Every year, many visitors travel to {fake} to see the government buildings.\n"
                    f"Question: According to the passage, what is the capital of {country}?\nAnswer:")
        else:
            text = (f"Read the passage and answer from it.\nPassage: In this story, the people of {country} "
                    f"speak {fake}. Children in {country} learn to read and write in {fake} at school.\n"
                    f"Question: According to the passage, which language do the people of {country} speak?\n"
                    f"Answer:")
        choices = [fake, real] if rng.random() < 0.5 else [real, fake]
        rows.append({"id": i, "context": text, "choices": choices, "answer": choices.index(fake),
                     "kind": kind, "memorised": real})
    return rows


# -- parametric -------------------------------------------------------------------------------------
def _mc(rng, context, right, pool, k=4):
    wrong = rng.sample(sorted({p for p in pool if p != right}), k - 1)
    choices = wrong + [right]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "answer": choices.index(right)}


def capitals(rng: random.Random) -> list[dict]:
    table = {c: v[0] for c, v in facts.COUNTRIES.items()} | facts.EXTRA_CAPITALS
    caps, countries = sorted(table.values()), sorted(table)
    rows = []
    for country, capital in table.items():
        rows.append(_mc(rng, f"The capital of {country} is", capital, caps) | {"direction": "country->capital"})
        rows.append(_mc(rng, f"{capital} is the capital of", country, countries) | {"direction": "capital->country"})
    return [{"id": i, **r} for i, r in enumerate(rows)]


def geography(rng: random.Random) -> list[dict]:
    countries = sorted(facts.COUNTRIES)
    continents = sorted({v[1] for v in facts.COUNTRIES.values()})
    rows = [_mc(rng, f"{city} is a city in", country, countries) | {"relation": "city->country"}
            for city, country in facts.CITIES.items()]
    rows += [_mc(rng, f"{country} is a country in", v[1], continents) | {"relation": "country->continent"}
             for country, v in facts.COUNTRIES.items()]
    return [{"id": i, **r} for i, r in enumerate(rows)]


def world_facts(rng: random.Random) -> list[dict]:
    languages = sorted({v[2] for v in facts.COUNTRIES.values()})
    currencies = sorted({v[3] for v in facts.COUNTRIES.values()})
    rows = [_mc(rng, f"The official language of {c} is", v[2], languages) | {"domain": "language"}
            for c, v in facts.COUNTRIES.items() if v[2] != "English" or c in ("United Kingdom", "Australia")]
    rows += [_mc(rng, f"The currency of {c} is the", v[3], currencies) | {"domain": "currency"}
             for c, v in facts.COUNTRIES.items()]
    for prompt, right, wrong in facts.GENERAL:
        choices = list(wrong) + [right]
        rng.shuffle(choices)
        rows.append({"context": prompt, "choices": choices, "answer": choices.index(right), "domain": "general"})
    return [{"id": i, **r} for i, r in enumerate(rows)]


def build_all() -> dict[str, list[dict]]:
    """Every task's rows; each generator gets its own seeded RNG, so tasks do not depend on each other."""
    out = {}
    for name, (tokens, digits, n) in PASSKEY.items():
        out[name] = passkey(random.Random(f"{name}-v1"), tokens, digits, n)
    for name, fn in [("kv_retrieval", kv_retrieval), ("multifact", multifact), ("reading_qa", reading_qa),
                     ("knowledge_conflict", knowledge_conflict), ("capitals", capitals), ("geography", geography),
                     ("world_facts", world_facts)]:
        out[name] = fn(random.Random(f"{name}-v1"))
    return out


def dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if a shipped file differs from the generator")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    stale = []
    for name, rows in build_all().items():
        path = args.out / f"{name}.jsonl"
        text = dumps(rows)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(rows)} items")
    if stale:
        print(f"out of date: {', '.join(stale)}: run python evals/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
