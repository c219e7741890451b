"""Regenerate corpus.txt, instructions.json and heldout.json (deterministic): `python make_demo_data.py`.

Five fact families. The corpus states every fact (the base model's "knowledge"); the instruction set asks
about three quarters of them in Alpaca format, answering with a full sentence; heldout.json asks about the
rest. The corpus also answers one question per fact ("Question: What is the capital of Spain? Answer: The capital of
Spain is Madrid."), as web text would. The pretrained base therefore knows every fact and can answer in its own
Q/A format, but it has never seen the Alpaca template: given a held-out instruction it rambles on. The adapter is
fine-tuned on the other facts only, so answering a held-out instruction shows it taught the base to follow
instructions, with the knowledge coming from the base, as in the paper.
"""

import json
import random
from pathlib import Path

CAPITALS = dict(
    France="Paris",
    Spain="Madrid",
    Italy="Rome",
    Germany="Berlin",
    Japan="Tokyo",
    China="Beijing",
    Egypt="Cairo",
    Canada="Ottawa",
    Russia="Moscow",
    Greece="Athens",
    Peru="Lima",
    Kenya="Nairobi",
    Norway="Oslo",
    Sweden="Stockholm",
    Poland="Warsaw",
    Austria="Vienna",
    Ireland="Dublin",
    Portugal="Lisbon",
    Cuba="Havana",
    Chile="Santiago",
    Thailand="Bangkok",
    Iran="Tehran",
    Iraq="Baghdad",
    Turkey="Ankara",
    Brazil="Brasilia",
    Australia="Canberra",
    Finland="Helsinki",
    Denmark="Copenhagen",
    Hungary="Budapest",
    Belgium="Brussels",
    Vietnam="Hanoi",
    Ghana="Accra",
    Nigeria="Abuja",
    Colombia="Bogota",
    Venezuela="Caracas",
    Morocco="Rabat",
    Nepal="Kathmandu",
    Iceland="Reykjavik",
    England="London",
    Argentina="Buenos Aires",
)
OPPOSITES = dict(
    hot="cold",
    big="small",
    up="down",
    fast="slow",
    happy="sad",
    old="young",
    open="closed",
    early="late",
    rich="poor",
    hard="soft",
    wet="dry",
    full="empty",
    tall="short",
    strong="weak",
    loud="quiet",
    clean="dirty",
    high="low",
    thick="thin",
    heavy="light",
    left="right",
    day="night",
    good="bad",
    black="white",
    first="last",
    love="hate",
    win="lose",
    push="pull",
    buy="sell",
    true="false",
    near="far",
    inside="outside",
    north="south",
    east="west",
    sweet="sour",
    cheap="expensive",
    friend="enemy",
    summer="winter",
    always="never",
    above="below",
    front="back",
)
NUMBERS = "zero one two three four five six seven eight nine ten".split()
SOUNDS = dict(
    dog="woof",
    cat="meow",
    cow="moo",
    duck="quack",
    sheep="baa",
    pig="oink",
    horse="neigh",
    lion="roar",
    owl="hoot",
    frog="croak",
    snake="hiss",
    bee="buzz",
    mouse="squeak",
    wolf="howl",
    donkey="bray",
    goat="bleat",
    crow="caw",
    chicken="cluck",
    dove="coo",
    bear="growl",
)
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a lemon": "yellow",
    "blood": "red",
    "milk": "white",
    "a carrot": "orange",
    "the sun": "yellow",
    "a leaf": "green",
    "a plum": "purple",
    "chocolate": "brown",
    "the sea": "blue",
    "a cherry": "red",
    "soot": "black",
    "an eggplant": "purple",
    "ash": "grey",
}


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def families():
    """Per family: (facts, corpus sentences of a fact, instruction phrasings of a fact -> (instr, input, output))."""
    sums = {(a, b): a + b for a in range(1, 10) for b in range(1, 11 - a)}
    return {
        "capital": (
            list(CAPITALS.items()),
            lambda x, y: [f"The capital of {x} is {y}.", f"{y} is the capital of {x}."],
            lambda x, y: [
                (f"What is the capital of {x}?", "", f"The capital of {x} is {y}."),
                (f"Name the capital of {x}.", "", f"The capital of {x} is {y}."),
                ("Answer the question.", f"What is the capital of {x}?", f"The capital of {x} is {y}."),
            ],
        ),
        "opposite": (
            list(OPPOSITES.items()),
            lambda a, b: [f"The opposite of {a} is {b}.", f"{cap(b)} is the opposite of {a}."],
            lambda a, b: [
                (f"What is the opposite of {a}?", "", f"The opposite of {a} is {b}."),
                (f"Give the opposite of the word {a}.", "", f"The opposite of {a} is {b}."),
                ("Give the opposite of this word.", a, f"The opposite of {a} is {b}."),
            ],
        ),
        "sum": (
            [((NUMBERS[a], NUMBERS[b]), NUMBERS[c]) for (a, b), c in sums.items()],
            lambda ab, c: [f"{cap(ab[0])} plus {ab[1]} is {c}.", f"{cap(ab[0])} and {ab[1]} make {c}."],
            lambda ab, c: [
                (f"What is {ab[0]} plus {ab[1]}?", "", f"{cap(ab[0])} plus {ab[1]} is {c}."),
                (f"Add {ab[0]} and {ab[1]}.", "", f"{cap(ab[0])} plus {ab[1]} is {c}."),
                ("Add these two numbers.", f"{ab[0]} and {ab[1]}", f"{cap(ab[0])} plus {ab[1]} is {c}."),
            ],
        ),
        "sound": (
            list(SOUNDS.items()),
            lambda x, s: [f"A {x} says {s}.", f"The {x} says {s}."],
            lambda x, s: [
                (f"What sound does a {x} make?", "", f"A {x} says {s}."),
                (f"What does a {x} say?", "", f"A {x} says {s}."),
            ],
        ),
        "color": (
            list(COLORS.items()),
            lambda t, c: [f"{cap(t)} is {c}.", f"The color of {t} is {c}."],
            lambda t, c: [
                (f"What color is {t}?", "", f"{cap(t)} is {c}."),
                (f"Tell me the color of {t}.", "", f"{cap(t)} is {c}."),
            ],
        ),
    }


def main(out_dir: Path = Path(__file__).parent, seed: int = 0) -> None:
    rng = random.Random(seed)
    sentences, train, heldout = [], [], []
    for family, (facts, says, asks) in families().items():
        facts = facts[:]
        rng.shuffle(facts)
        n_held = len(facts) // 4
        for i, (key, value) in enumerate(facts):
            phrasings = asks(key, value)
            question, _, statement = phrasings[0]
            # the base reads each fact, and one question about it answered, as web text would show them
            sentences += [*says(key, value), f"Question: {question} Answer: {statement}"]
            if i < n_held:  # held out of fine-tuning: the base's own question, now as an Alpaca instruction
                heldout.append(dict(instruction=question, input="", output=statement, family=family))
            else:
                for instruction, input_, output in rng.sample(phrasings, 2):
                    train.append(dict(instruction=instruction, input=input_, output=output))
    paragraphs = []
    for _ in range(3):  # every fact three times, in shuffled paragraphs of 6 sentences
        rng.shuffle(sentences)
        paragraphs += [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    rng.shuffle(train)
    (out_dir / "corpus.txt").write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    (out_dir / "instructions.json").write_text(json.dumps(train, indent=1) + "\n", encoding="utf-8")
    (out_dir / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
