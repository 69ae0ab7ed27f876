"""Write the shipped retrieval task (src/mlxlab/assets/jargon_retrieval/): field notes on
made-up creatures of a made-up survey, written in the survey's jargon ("a brindlecoat
fenwallow of the mirekith that grazes on shalestone"), and questions that ask for a creature in
plain words ("which striped animal of the swamp eats rocks?"). The jargon is invented, so a
pretrained embedder cannot tell which note a question paraphrases; a fine-tune on training pairs
(question, note) learns the words, and is scored on held-out notes and questions it never saw,
with other combinations of the same words: a BEIR folder jargon/ (corpus.jsonl, queries.jsonl,
qrels/test.tsv) and train.jsonl of anchor/positive rows. Deterministic for a seed.

    python scripts/make_jargon_retrieval.py [--train 800] [--test 200] [--seed 0] \
        [--out src/mlxlab/assets/jargon_retrieval]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# attribute -> [(jargon, [plain paraphrases])]
ATTRIBUTES = {
    "habitat": [("mirekith", ["swamp", "marsh", "bog"]), ("skarrow", ["cliff", "crag", "rock face"]),
                ("dunmere", ["desert", "sand dunes", "dry waste"]),
                ("velloch", ["forest", "woods", "woodland"]),
                ("glasswater", ["lake", "pond", "still water"]),
                ("hoarfell", ["snowfield", "glacier", "ice plain"]),
                ("underbrake", ["cave", "cavern", "underground"]),
                ("tidereach", ["seashore", "beach", "coast"])],
    "diet": [("shalestone", ["rocks", "stones", "pebbles"]), ("emberleaf", ["red leaves", "autumn leaves", "dry leaves"]),
             ("glimfish", ["small fish", "minnows", "fry"]), ("mothsilk", ["moths", "flying insects", "night insects"]),
             ("rootmash", ["roots", "tubers", "bulbs"]), ("dewcap", ["mushrooms", "fungi", "toadstools"]),
             ("carrionfall", ["dead animals", "carcasses", "carrion"]),
             ("sunseed", ["seeds", "grain", "kernels"])],
    "coat": [("brindlecoat", ["striped", "banded", "with stripes"]),
             ("ashpelt", ["grey", "gray", "ash-coloured"]), ("emberhide", ["red", "rust-coloured", "crimson"]),
             ("frostmane", ["white", "pale", "snow-white"]), ("duskfur", ["black", "dark", "jet-black"]),
             ("spotwhorl", ["spotted", "dotted", "speckled"]), ("goldsheen", ["golden", "yellow", "blond"]),
             ("mossback", ["green", "greenish", "moss-green"])],
    "body": [("fenwallow", ["lizard", "reptile", "scaly creature"]),
             ("quillhound", ["dog-like animal", "hound", "canine"]),
             ("hoverling", ["bird", "winged creature", "flyer"]),
             ("burrowmaw", ["mole-like digger", "burrower", "digging animal"])],
    "time": [("lumenwake", ["active by day", "out in daylight", "diurnal"]),
             ("gloamward", ["active at night", "nocturnal", "out after dark"]),
             ("twilit", ["active at dusk", "seen at dawn and dusk", "crepuscular"]),
             ("seasonal", ["seen only in summer", "a summer visitor", "around in the warm months"])],
}
SYLLABLES = ["ka", "ro", "vi", "sel", "mor", "tha", "ne", "quo", "li", "dra", "pen", "zu", "gar",
             "wen", "fi", "osk", "ta", "bel", "ny", "cor"]
NOTE = ("Survey note: the {name} is a {time} {coat} {body} of the {habitat} that feeds on {diet}.")
QUESTIONS = ["Which {coat} {body} lives in the {habitat} and eats {diet}?",
             "What {body} that is {time} feeds on {diet} in the {habitat}?",
             "Find the {coat} {body} that is {time} and eats {diet}.",
             "Which {coat} animal of the {habitat} is {time}?"]


def _creatures(rng: np.random.Generator, n: int) -> list[dict[str, int]]:
    """n distinct combinations of attribute values (indices)."""
    seen, out = set(), []
    while len(out) < n:
        combo = tuple(int(rng.integers(len(v))) for v in ATTRIBUTES.values())
        if combo not in seen:
            seen.add(combo)
            out.append(dict(zip(ATTRIBUTES, combo)))
    return out


def note(rng: np.random.Generator, creature: dict[str, int]) -> str:
    name = "".join(rng.choice(SYLLABLES, size=3)).capitalize()
    return NOTE.format(name=name, **{a: ATTRIBUTES[a][i][0] for a, i in creature.items()})


def question(rng: np.random.Generator, creature: dict[str, int]) -> str:
    words = {a: str(rng.choice(ATTRIBUTES[a][i][1])) for a, i in creature.items()}
    return str(rng.choice(QUESTIONS)).format(**words)


def write_task(out: Path, train: int = 800, test: int = 200, seed: int = 0) -> Path:
    """train.jsonl (anchor: question, positive: note) and the BEIR folder jargon/, held-out
    creatures only; returns `out`."""
    rng = np.random.default_rng(seed)
    creatures = _creatures(rng, train + test)
    notes = [note(rng, c) for c in creatures]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for c, text in zip(creatures[:train], notes[:train]):
            f.write(json.dumps({"anchor": question(rng, c), "positive": text}) + "\n")
    beir = out / "jargon"  # a BEIR folder is named after its data set
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(beir / "corpus.jsonl", "w") as corpus, open(beir / "queries.jsonl", "w") as queries, \
            open(beir / "qrels" / "test.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for k, (c, text) in enumerate(zip(creatures[train:], notes[train:])):
            corpus.write(json.dumps({"_id": f"d{k}", "title": "", "text": text}) + "\n")
            queries.write(json.dumps({"_id": f"q{k}", "text": question(rng, c)}) + "\n")
            qrels.write(f"q{k}\td{k}\t1\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="src/mlxlab/assets/jargon_retrieval")
    args = parser.parse_args()
    print(write_task(Path(args.out), args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
