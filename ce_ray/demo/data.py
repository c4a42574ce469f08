"""A small, self-made dataset for ``ce-ray demo``: NLI pairs and question/passage reranking.

``ce-ray demo`` has to run on a fresh clone with no network and no external dataset, so this module
writes its own: real English sentences, a few hundred pairs per task, as Parquet files, in about a
second. Files and keys are listed in :func:`write_demo_data`.

NLI
===

``nli_train`` / ``nli_dev`` / ``nli_test``: ``premise``, ``hypothesis`` (str), ``label`` (int64:
0 entailment, 1 neutral, 2 contradiction); 360 / 90 / 90 rows, exactly balanced. Premises describe a
simple scene, "<subject> is <action> <place> [<time or purpose>]." ("A young woman is playing the
violin in a park."), composed from hand-written lexicons: subjects (adults, children, groups, dogs,
each with more general forms), actions (each with hypernyms, the actions that cannot happen at the
same time, purposes and unverifiable details), places (indoor or outdoor) and times (in pairs that
exclude each other). Every premise gets exactly one hypothesis per label, each from several templates:

- entailment: hypernyms ("A woman is playing an instrument."), the place generalised ("Someone is
  making music outdoors."), negating something incompatible ("The woman is not playing football.",
  "The woman is not indoors."), "There is a woman in the park.", repeating the premise's time or
  purpose with a hypernym;
- neutral: an added purpose, time or detail that the premise neither states nor rules out ("The woman
  is playing the violin to earn some money.", "The woman is not practising for a concert."), "There
  is nobody else in the park.", "Only one person is ..." for a single subject;
- contradiction: a conflicting action ("The woman is playing football."), place ("... in a living
  room.", "... indoors."), time ("... on a warm summer day." for "... on a freezing winter day."),
  number ("Only one teenager is ..." for three teenagers) or a negation ("Nobody is making music.",
  "There is nobody in the park.").

The conflicting actions are the other actions of the lexicon, so "The girl is reading a book." is
entailed by one premise and contradicted by another; negations occur under all three labels and
hypothesis lengths are similar across labels. The label therefore depends on the hypothesis *relative
to its premise*: a hypothesis-only bag-of-words classifier scores 0.6-0.7 on dev/test (chance 0.33),
about what such baselines score on SNLI. Dev and test premises use (subject, action) combinations
absent from train and from each other. A CrossEncoder on the bundled MiniLM reaches about 0.7 dev
accuracy after 2 epochs at learning rate 2e-4 (batch 16), or 6 epochs at 5e-5; 2 epochs at 5e-5 are
mostly spent leaving the 1.10 loss plateau of the fresh classification head (about 0.45).

Reranking
=========

``rerank_train``: ``query``, ``positive`` (str), ``negative`` (list[str], up to 4 labelled hard
negatives: non-answering statements about the same entity or topic), 250 rows. ``rerank_dev`` /
``rerank_test``: ``query`` (str), ``positive`` (list[str]), ``negative`` (list[str], 10-15 each),
60 queries each. Built from a hand-written mini knowledge base of well-known, stable facts:
48 countries (capital, language, currency, location), 26 chemical elements (symbol, atomic number)
and about 50 facts about planets, animals, discoveries, books, geography and science. Each fact has
several question phrasings ("What is the capital of Japan?", "Tokyo is the capital of which
country?") and an encyclopedia-style answer passage ("Tokyo is the capital of Japan and its most
populous city."). Facts are held out per kind (country capitals, element symbols, planet facts...):
dev and test ask about (entity, attribute) combinations that train never asks about, so a model has
to learn "question about X's capital <-> passage stating X's capital", not the facts. Their negatives
mix hard ones (true but non-answering statements about the same entity, such as "Kyoto was the
imperial capital of Japan for more than a thousand years.", other attributes of the same entity,
the same attribute of other entities) with easy random passages.

Provenance and licence
======================

Every sentence is written or composed here for this project and is distributed under the project's
licence; nothing is copied from any dataset (in particular not from the research data under
``shared/data`` that some tests use). Output is deterministic: fixed seeds and fixed lexicons give
byte-identical files on every run (for given pandas/pyarrow versions).

Usage: ``python -m ce_ray.demo.data OUT_DIR`` writes the files and prints their row counts.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["SEED", "build_nli", "build_rerank", "write_demo_data"]

SEED = 1234

ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2

# ============================================================================================
# NLI lexicons
# ============================================================================================


@dataclass(frozen=True)
class Subject:
    key: str
    text: str  # "A young woman"
    the: str  # "The woman"
    hypers: tuple[str, ...]  # entailed, more general subjects ("A woman", "Someone")
    pos: str  # possessive pronoun
    kind: str  # "adult", "child" or "dog": which actions fit
    plural: bool = False
    one: str = ""  # singular noun for "Only one <one> is ...", plural subjects only

    @property
    def be(self) -> str:
        return "are" if self.plural else "is"

    @property
    def nobody(self) -> str:
        return "No animal" if self.kind == "dog" else "Nobody"

    @property
    def empty(self) -> str:  # "There is nobody" + place: contradicts the premise
        return "There are no animals" if self.kind == "dog" else "There is nobody"

    @property
    def nobody_else(self) -> str:  # "There is nobody else" + place: neutral
        return "There are no other dogs" if self.kind == "dog" else "There is nobody else"


@dataclass(frozen=True)
class Place:
    text: str  # "in a park"
    the: str  # "in the park"
    outdoor: bool | None  # None: could be either


@dataclass(frozen=True)
class Action:
    key: str
    text: str  # "playing the violin"
    hypers: tuple[str, ...]  # entailed verb phrases ("playing an instrument")
    kinds: tuple[str, ...]
    places: tuple[str, ...]
    conflicts: tuple[str, ...]  # verb phrases that cannot be true at the same time
    purposes: tuple[str, ...]  # unverifiable additions after the action ("to earn some money")
    states: tuple[str, ...] = ()  # unverifiable "The <subject> is <state>."
    hyper_with_place: bool = True  # False when "<hyper> <place>" reads badly ("in the water in a lake")
    plural: tuple[str, tuple[str, ...]] | None = None  # (text, hypers) for plural subjects, when they differ

    def say(self, plural: bool) -> str:
        return self.plural[0] if plural and self.plural else self.text

    def hyper_options(self, plural: bool) -> tuple[str, ...]:
        return self.plural[1] if plural and self.plural else self.hypers


PLACES: dict[str, Place] = {
    "park": Place("in a park", "in the park", True),
    "street": Place("on a busy street", "on the street", True),
    "beach": Place("on a beach", "on the beach", True),
    "bench": Place("on a park bench", "on the park bench", True),
    "garden": Place("in a garden", "in the garden", True),
    "field": Place("on a grass field", "on the field", True),
    "campsite": Place("at a campsite", "at the campsite", True),
    "river": Place("by a river", "by the river", True),
    "mountain_path": Place("on a mountain path", "on the mountain path", True),
    "mountains": Place("in the mountains", "in the mountains", True),
    "balcony": Place("on a balcony", "on the balcony", True),
    "forest": Place("in a forest", "in the forest", True),
    "lake": Place("in a lake", "in the lake", True),
    "sea": Place("in the sea", "in the sea", True),
    "in_river": Place("in a river", "in the river", True),
    "living_room": Place("in a living room", "in the living room", False),
    "concert_hall": Place("in a concert hall", "in the concert hall", False),
    "library": Place("in a library", "in the library", False),
    "kitchen": Place("in a kitchen", "in the kitchen", False),
    "restaurant": Place("in a restaurant", "in the restaurant", False),
    "sports_hall": Place("in a sports hall", "in the sports hall", False),
    "pool": Place("in an indoor pool", "in the pool", False),
    "studio": Place("in an art studio", "in the studio", False),
    "classroom": Place("in a classroom", "in the classroom", False),
    "coffee_shop": Place("in a coffee shop", "in the coffee shop", False),
    "gym": Place("in a gym", "in the gym", False),
    "museum": Place("in a museum", "in the museum", False),
    "church": Place("in a church", "in the church", False),
    "school_hall": Place("in a school hall", "in the school hall", False),
    "train": Place("on a train", "on the train", None),
}

WATER = {PLACES[k].text for k in ("lake", "sea", "in_river", "pool")}  # "sleeping in a lake" reads badly

IO_WORDS = {True: ("outdoors", "outside"), False: ("indoors", "inside")}

SUBJECTS: tuple[Subject, ...] = (
    Subject("young_woman", "A young woman", "The woman", ("A woman", "Someone"), "her", "adult"),
    Subject("old_man", "An old man", "The old man", ("A man", "Someone"), "his", "adult"),
    Subject("middle_aged_man", "A middle-aged man", "The man", ("A man", "A person"), "his", "adult"),
    Subject("elderly_woman", "An elderly woman", "The woman", ("An old woman", "A person"), "her", "adult"),
    Subject("tall_man", "A tall man", "The man", ("A man", "Someone"), "his", "adult"),
    Subject("teenagers", "Three teenagers", "The teenagers", ("Some teenagers", "Some young people"), "their",
            "adult", plural=True, one="teenager"),
    Subject("two_women", "Two women", "The women", ("Some women", "Some people"), "their", "adult",
            plural=True, one="woman"),
    Subject("two_men", "Two young men", "The men", ("Some men", "Some people"), "their", "adult",
            plural=True, one="man"),
    Subject("girl", "A little girl", "The girl", ("A girl", "A child"), "her", "child"),
    Subject("boy", "A young boy", "The boy", ("A boy", "A child"), "his", "child"),
    Subject("children", "Four children", "The children", ("Some children", "Some kids"), "their", "child",
            plural=True, one="child"),
    Subject("brown_dog", "A brown dog", "The dog", ("A dog", "An animal"), "its", "dog"),
    Subject("white_dog", "A small white dog", "The dog", ("A dog", "An animal"), "its", "dog"),
    Subject("puppies", "Two puppies", "The puppies", ("Some dogs", "Some animals"), "their", "dog",
            plural=True, one="puppy"),
)

# Unverifiable states of the subject itself ("The woman is on holiday."): neutral for any premise.
SUBJECT_STATES: dict[tuple[str, bool], tuple[str, ...]] = {
    ("adult", False): ("on holiday", "on {pos} day off", "wearing a blue jacket", "in a good mood"),
    ("adult", True): ("on holiday", "on their day off", "old friends", "in a good mood"),
    ("child", False): ("seven years old", "wearing a yellow raincoat", "wearing a red cap", "in a good mood"),
    ("child", True): ("cousins", "best friends", "wearing school uniforms", "in a good mood"),
    ("dog", False): ("wearing a red collar", "three years old", "very hungry", "a family pet"),
    ("dog", True): ("wearing red collars", "very hungry", "family pets"),
}

# Pairs of times that cannot both be true of the same moment; a premise may carry either.
_TIME_PAIRS = (
    ("on a Sunday morning", "on a Wednesday evening"),
    ("late in the afternoon", "early in the morning"),
    ("on a warm summer day", "on a freezing winter day"),
    ("on a Saturday afternoon", "on a Monday morning"),
    ("late at night", "around noon"),
)
TIMES: dict[str, str] = {**dict(_TIME_PAIRS), **{b: a for a, b in _TIME_PAIRS}}

PEOPLE = ("adult", "child")
MUSIC = ("playing an instrument", "making music", "playing music")

# conflicts: keys of other actions (their text is used) or literal verb phrases; each is something the
# subject cannot be doing at the same time. Drawing conflicts from the other actions means a bare
# hypothesis such as "The girl is reading a book." is entailed by one premise and contradicted by others.
ACTIONS: tuple[Action, ...] = (
    Action("violin", "playing the violin", MUSIC, PEOPLE,
           ("park", "street", "living_room", "concert_hall"),
           ("guitar", "piano", "swimming", "football", "dishes", "climbing", "letter", "sleeping"),
           ("to earn some money", "for a small crowd", "for the first time"),
           ("practising for a concert", "playing a piece by Mozart")),
    Action("guitar", "playing the guitar", MUSIC, PEOPLE,
           ("park", "beach", "living_room", "street"),
           ("violin", "piano", "swimming", "football", "dishes", "climbing", "letter", "painting", "sleeping"),
           ("to earn some money", "for {pos} friends", "for a small crowd"),
           ("practising for a concert", "playing a famous song")),
    Action("piano", "playing the piano", MUSIC, PEOPLE,
           ("living_room", "concert_hall", "classroom"),
           ("violin", "guitar", "swimming", "football", "bicycle", "climbing", "running", "sleeping"),
           ("for {pos} family", "to prepare for an exam"),
           ("taking a lesson", "playing a piece by Chopin")),
    Action("bicycle", "riding a bicycle", ("riding a bike", "cycling"), PEOPLE,
           ("street", "park", "river", "mountain_path"),
           ("swimming", "piano", "climbing", "dishes", "painting", "letter", "sleeping", "sitting on a sofa"),
           ("to visit a friend", "for exercise"),
           ("wearing protective gear", "training for a race"),
           plural=("riding bicycles", ("riding bikes", "cycling"))),
    Action("reading", "reading a book", ("reading", "looking at a book"), PEOPLE,
           ("library", "bench", "living_room", "train"),
           ("swimming", "football", "climbing", "dishes", "violin", "guitar", "painting", "sleeping"),
           ("for a school project", "to pass the time"),
           ("reading a detective story", "studying for an exam"),
           plural=("reading books", ("reading", "looking at books"))),
    Action("cooking", "cooking dinner", ("preparing food", "making a meal", "cooking"), ("adult",),
           ("kitchen", "restaurant", "campsite"),
           ("swimming", "football", "climbing", "bicycle", "violin", "piano", "sleeping"),
           ("for {pos} family", "for some guests"),
           ("making a vegetable soup", "following a recipe")),
    Action("football", "playing football", ("playing a sport", "playing a ball game", "playing a game"), PEOPLE,
           ("park", "beach", "field", "sports_hall"),
           ("swimming", "reading", "piano", "violin", "painting", "letter", "dishes", "sleeping"),
           ("for a local team", "with {pos} friends"),
           ("winning the game", "training for a tournament")),
    Action("swimming", "swimming", ("in the water",), PEOPLE,
           ("lake", "sea", "pool"),
           ("bicycle", "reading", "piano", "cooking", "football", "painting", "letter", "sitting on a sofa",
            "sleeping in bed"),
           ("to cool off", "for exercise"),
           ("training for a race", "trying to swim faster"), hyper_with_place=False),
    Action("painting", "painting a picture", ("making art", "painting", "creating a picture"), PEOPLE,
           ("garden", "river", "studio", "classroom"),
           ("swimming", "football", "violin", "guitar", "climbing", "dishes", "bicycle", "sleeping"),
           ("for an art class", "as a gift for a friend"),
           ("painting a portrait", "preparing for an exhibition"),
           plural=("painting pictures", ("making art", "painting", "creating pictures"))),
    Action("coffee", "drinking coffee", ("having a drink", "drinking something"), ("adult",),
           ("coffee_shop", "kitchen", "balcony", "garden"),
           ("swimming", "violin", "climbing", "football", "singing", "sleeping"),
           ("before work", "with a friend"),
           ("reading the news", "waiting for a taxi")),
    Action("dishes", "washing dishes", ("cleaning", "doing the dishes", "cleaning plates"), PEOPLE,
           ("kitchen", "restaurant"),
           ("swimming", "football", "bicycle", "climbing", "violin", "guitar", "piano", "painting", "sleeping"),
           ("after dinner", "to help {pos} family"),
           ("listening to the radio", "in a hurry")),
    Action("climbing", "climbing a rock wall", ("climbing", "exercising"), PEOPLE,
           ("gym", "mountains"),
           ("swimming", "bicycle", "reading", "piano", "violin", "dishes", "cooking", "sleeping"),
           ("for the first time", "with a friend"),
           ("wearing safety gear", "training for a competition")),
    Action("running", "running", ("moving quickly", "exercising"), PEOPLE,
           ("beach", "park", "gym", "river"),
           ("swimming", "piano", "climbing", "painting", "dishes", "cooking", "letter", "sleeping", "sitting still"),
           ("for exercise", "to get fit"),
           ("training for a marathon", "listening to music")),
    Action("sandwich", "eating a sandwich", ("eating", "having some food"), PEOPLE,
           ("bench", "kitchen", "coffee_shop", "beach"),
           ("swimming", "singing", "violin", "guitar", "climbing", "sleeping"),
           ("for lunch", "after a long walk"),
           ("very hungry", "sitting in the sun"),
           plural=("eating sandwiches", ("eating", "having some food"))),
    Action("letter", "writing a letter", ("writing", "writing something"), PEOPLE,
           ("library", "coffee_shop", "living_room", "train"),
           ("swimming", "football", "bicycle", "climbing", "violin", "guitar", "running", "sleeping"),
           ("to an old friend", "to {pos} grandmother"),
           ("writing with a pencil", "writing in French"),
           plural=("writing letters", ("writing", "writing something"))),
    Action("photo", "taking a photograph", ("using a camera", "taking a picture"), PEOPLE,
           ("beach", "street", "museum", "park"),
           ("violin", "guitar", "piano", "climbing", "dishes", "letter", "sleeping"),
           ("for a newspaper", "of a friend"),
           ("standing very still", "learning photography"),
           plural=("taking photographs", ("using cameras", "taking pictures"))),
    Action("singing", "singing a song", ("singing", "making music", "performing a song"), PEOPLE,
           ("church", "park", "street", "school_hall"),
           ("swimming", "sandwich", "coffee", "sleeping"),
           ("for {pos} friends", "to earn some money"),
           ("practising for a concert", "singing a love song")),
    # dogs
    Action("ball", "chasing a red ball", ("chasing a ball", "playing with a ball", "running after a ball"), ("dog",),
           ("park", "beach", "garden"),
           ("digging", "frisbee", "sleeping", "lying still", "eating from a bowl"),
           ("thrown by a child", "thrown by {pos} owner"),
           ("barking loudly",)),
    Action("dog_swim", "swimming", ("in the water",), ("dog",),
           ("lake", "sea", "in_river"),
           ("digging", "frisbee", "sleeping on a sofa", "lying on the grass", "eating from a bowl"),
           ("to fetch a stick", "to cool off"),
           ("following {pos} owner",), hyper_with_place=False),
    Action("digging", "digging a hole", ("digging", "making a hole in the ground"), ("dog",),
           ("garden", "beach", "park"),
           ("dog_swim", "ball", "frisbee", "sleeping", "lying on a sofa"),
           ("to hide a bone", "to find a bone"),
           ("barking at a cat",)),
    Action("stick", "carrying a stick", ("holding a stick", "carrying something"), ("dog",),
           ("park", "beach", "forest"),
           ("frisbee", "sleeping", "eating from a bowl", "chewing a bone"),
           ("to give it to {pos} owner", "for a game of fetch"),
           ("walking next to {pos} owner",),
           plural=("carrying sticks", ("holding sticks", "carrying something"))),
    Action("frisbee", "jumping to catch a frisbee", ("jumping", "playing with a frisbee", "trying to catch something"),
           ("dog",),
           ("park", "beach", "garden"),
           ("dog_swim", "digging", "stick", "sleeping", "lying on a sofa"),
           ("thrown by {pos} owner", "for the first time"),
           ("barking with excitement",)),
)
ACTION_BY_KEY = {a.key: a for a in ACTIONS}


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[0].upper() + text[1:] + "."


@dataclass
class _Scene:
    """One premise: subject, action, place and optionally a time or purpose; draws its hypotheses."""

    s: Subject
    a: Action
    p: Place
    rng: random.Random = field(repr=False)
    time: str = ""
    purpose: str = ""

    def f(self, text: str) -> str:
        return text.format(pos=self.s.pos)

    def pick(self, options) -> str:
        return self.f(self.rng.choice(list(options)))

    @property
    def premise(self) -> str:
        return _sentence(f"{self.s.text} {self.s.be} {self.atext()} {self.p.text} {self.detail}")

    @property
    def detail(self) -> str:
        return self.time or self.f(self.purpose)

    def io(self, outdoor: bool) -> str:
        return self.rng.choice(IO_WORDS[outdoor])

    def conflict(self, at_place: bool = False) -> str | None:
        """Something the subject cannot be doing at the same time (optionally: that fits the place)."""
        options = []
        for c in self.a.conflicts:
            other = ACTION_BY_KEY.get(c)
            if other is None:  # a literal phrase; with a place only if it names none ("sleeping")
                if not at_place or not set(c.split()) & {"in", "on", "at"} and self.p.text not in WATER:
                    options.append(c)
            elif self.s.kind in other.kinds and (not at_place or any(PLACES[k] == self.p for k in other.places)):
                options.append(other.say(self.s.plural))
        return self.pick(options) if options else None

    def opposite_place(self) -> Place | None:
        if self.p.outdoor is None:
            return None
        options = [PLACES[k] for k in self.a.places if PLACES[k].outdoor is (not self.p.outdoor)]
        return self.rng.choice(options) if options else None

    def atext(self, sg: bool = False) -> str:
        """The action, agreeing with the subject (``sg``: for a singular subject such as "Nobody")."""
        return self.f(self.a.say(self.s.plural and not sg))

    def ahypers(self, sg: bool = False) -> tuple[str, ...]:
        return self.a.hyper_options(self.s.plural and not sg)

    def action_or_hyper(self, sg: bool = False) -> str:
        if self.a.hyper_with_place and self.rng.random() < 0.5:
            return self.pick(self.ahypers(sg))
        return self.atext(sg)


# Each template returns a hypothesis or None when it does not apply to the scene.
# --- entailment ---
def _e_hyper(c: _Scene):
    return f"{c.pick(c.s.hypers)} {c.s.be} {c.pick(c.ahypers())}"


def _e_the_action(c: _Scene):
    return f"{c.pick((c.s.the, *c.s.hypers))} {c.s.be} {c.atext()}"


def _e_hyper_place(c: _Scene):
    if not c.a.hyper_with_place:
        return None
    return f"{c.pick((c.s.text, *c.s.hypers))} {c.s.be} {c.pick(c.ahypers())} {c.pick((c.p.text, c.p.the))}"


def _e_io(c: _Scene):
    if c.p.outdoor is None:
        return None
    return f"{c.pick((c.s.text, *c.s.hypers))} {c.s.be} {c.action_or_hyper()} {c.io(c.p.outdoor)}"


def _e_not_conflict(c: _Scene):
    conflict = c.conflict()
    return conflict and f"{c.s.the} {c.s.be} not {conflict}"


def _e_not_io(c: _Scene):
    if c.p.outdoor is None:
        return None
    return f"{c.s.the} {c.s.be} not {c.io(not c.p.outdoor)}"


def _e_there(c: _Scene):
    hyper = c.pick(c.s.hypers)
    return f"There {c.s.be} {hyper[0].lower()}{hyper[1:]} {c.p.the}"


def _e_more_than_one(c: _Scene):
    if not c.s.plural:
        return None
    return f"More than one {c.s.one} is {c.action_or_hyper(sg=True)}"


def _e_detail(c: _Scene):
    if not c.detail:
        return None
    return f"{c.s.the} {c.s.be} {c.action_or_hyper()} {c.detail}"


# --- neutral ---
def _n_purpose(c: _Scene):
    if c.purpose:
        return None
    return f"{c.pick((c.s.the, *c.s.hypers))} {c.s.be} {c.action_or_hyper()} {c.pick(c.a.purposes)}"


def _n_time(c: _Scene):
    if c.time:
        return None
    return f"{c.pick((c.s.the, *c.s.hypers))} {c.s.be} {c.action_or_hyper()} {c.rng.choice(list(TIMES))}"


def _n_state(c: _Scene):
    if not c.a.states:
        return None
    return f"{c.s.the} {c.s.be} {c.pick(c.a.states)}"


def _n_subject_state(c: _Scene):
    return f"{c.s.the} {c.s.be} {c.pick(SUBJECT_STATES[(c.s.kind, c.s.plural)])}"


def _n_not_state(c: _Scene):
    if not c.a.states:
        return None
    return f"{c.s.the} {c.s.be} not {c.pick(c.a.states)}"


def _n_nobody_else(c: _Scene):
    if c.purpose:  # "with a friend", "for a small crowd"... would make it a contradiction
        return None
    return f"{c.s.nobody_else} {c.p.the}"


def _n_only_one(c: _Scene):  # a single subject says nothing about whether others do the same
    if c.s.plural or c.purpose:
        return None
    noun = "dog" if c.s.kind == "dog" else "person"
    return f"Only one {noun} is {c.atext(sg=True)} {c.p.the}"


def _n_more_than_one(c: _Scene):
    if c.s.plural or c.purpose:
        return None
    noun = "dog" if c.s.kind == "dog" else "person"
    return f"More than one {noun} is {c.action_or_hyper(sg=True)}"


# --- contradiction ---
def _c_conflict(c: _Scene):
    subject, conflict = c.pick((c.s.text, c.s.the)), c.conflict()
    return conflict and f"{subject} {c.s.be} {conflict}"


def _c_conflict_place(c: _Scene):
    conflict = c.conflict(at_place=True)
    if conflict is None:
        return None
    return f"{c.pick((c.s.text, c.s.the))} {c.s.be} {conflict} {c.pick((c.p.text, c.p.the))}"


def _c_place(c: _Scene):
    other = c.opposite_place()
    if other is None:
        return None
    return f"{c.pick((c.s.text, c.s.the))} {c.s.be} {c.atext()} {other.text}"


def _c_io(c: _Scene):
    if c.p.outdoor is None:
        return None
    return f"{c.pick((c.s.text, *c.s.hypers))} {c.s.be} {c.action_or_hyper()} {c.io(not c.p.outdoor)}"


def _c_not_io(c: _Scene):
    if c.p.outdoor is None:
        return None
    return f"{c.s.the} {c.s.be} not {c.io(c.p.outdoor)}"


def _c_nobody(c: _Scene):
    return f"{c.s.nobody} is {c.action_or_hyper(sg=True)}"


def _c_not(c: _Scene):
    return f"{c.s.the} {c.s.be} not {c.action_or_hyper()}"


def _c_empty(c: _Scene):
    return f"{c.s.empty} {c.p.the}"


def _c_only_one(c: _Scene):
    if not c.s.plural:
        return None
    return f"Only one {c.s.one} is {c.atext(sg=True)} {c.p.the}"


def _c_time(c: _Scene):
    if not c.time:
        return None
    return f"{c.pick((c.s.text, c.s.the))} {c.s.be} {c.action_or_hyper()} {TIMES[c.time]}"


TEMPLATES = {
    ENTAILMENT: (_e_hyper, _e_the_action, _e_hyper_place, _e_io, _e_not_conflict, _e_not_io, _e_there,
                 _e_more_than_one, _e_detail),
    NEUTRAL: (_n_purpose, _n_time, _n_state, _n_subject_state, _n_not_state, _n_nobody_else, _n_only_one,
              _n_more_than_one),
    CONTRADICTION: (_c_conflict, _c_conflict_place, _c_place, _c_io, _c_not_io, _c_nobody, _c_not, _c_empty,
                    _c_only_one, _c_time),
}


def _hypothesis(scene: _Scene, label: int) -> str:
    templates = list(TEMPLATES[label])
    scene.rng.shuffle(templates)
    # Details in the premise are rare, so the templates that use them go first when they apply.
    templates.sort(key=lambda t: t not in (_e_detail, _c_time) or not scene.detail)
    for template in templates:
        text = template(scene)
        if text is not None and _sentence(text) != scene.premise:
            return _sentence(text)
    raise AssertionError(f"no template applies to {scene.premise!r} for label {label}")  # pragma: no cover


def build_nli(seed: int = SEED, n_train: int = 120, n_dev: int = 30, n_test: int = 30,
              detail_rate: float = 0.3) -> dict[str, pd.DataFrame]:
    """NLI splits with one hypothesis per label for each premise (``3 * n_*`` rows each).

    Premises of dev and test use (subject, action) combinations that do not occur in train (nor in
    each other), so scores measure generalisation to new scenes. ``detail_rate`` of the premises
    carry a time or a purpose, which hypotheses then repeat (entailment), contradict (times) or
    leave out while adding the other kind (neutral).
    """
    rng = random.Random(seed)
    combos = [(s, a) for s in SUBJECTS for a in ACTIONS if s.kind in a.kinds]
    rng.shuffle(combos)
    if n_dev + n_test >= len(combos):
        raise ValueError(f"only {len(combos)} subject/action combinations")
    pools = {"test": combos[:n_test], "dev": combos[n_test:n_test + n_dev], "train": combos[n_test + n_dev:]}
    out: dict[str, pd.DataFrame] = {}
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        # Every combination once (at a random place), then more places for the same combinations.
        chosen: list[tuple[Subject, Action, str]] = []
        seen: set[tuple[str, str, str]] = set()
        order = list(pools[split])
        while len(chosen) < n:
            before = len(chosen)
            for s, a in order:
                free = [p for p in a.places if (s.key, a.key, p) not in seen]
                if len(chosen) >= n or not free:
                    continue
                p = rng.choice(free)
                seen.add((s.key, a.key, p))
                chosen.append((s, a, p))
            if len(chosen) == before:
                raise ValueError(f"not enough scenes for {n} {split} premises")
            rng.shuffle(order)
        rows = []
        for s, a, p in chosen:
            scene = _Scene(s, a, PLACES[p], rng)
            if rng.random() < detail_rate:
                if rng.random() < 0.5:
                    scene.time = rng.choice(list(TIMES))
                else:
                    scene.purpose = rng.choice(a.purposes)
            for label in (ENTAILMENT, NEUTRAL, CONTRADICTION):
                rows.append({"premise": scene.premise, "hypothesis": _hypothesis(scene, label), "label": label})
        df = pd.DataFrame(rows, columns=["premise", "hypothesis", "label"])
        df["label"] = df["label"].astype("int64")
        out[split] = df.sample(frac=1.0, random_state=rng.randrange(2**31)).reset_index(drop=True)
    return out


# ============================================================================================
# Reranking knowledge base
# ============================================================================================

@dataclass(frozen=True)
class Country:
    name: str  # as used mid-sentence: "Japan", "the Netherlands"
    capital: str
    capital_passage: str
    language_passage: str
    currency: str  # "yen", "Swedish krona"
    currency_passage: str  # "" = built from a template
    location_passage: str


def _c(name, capital, capital_passage, language_passage, currency, location_passage, currency_passage=""):
    return Country(name, capital, capital_passage, language_passage, currency, currency_passage, location_passage)


def _euro(country: str, old: str) -> str:
    return f"{country} uses the euro, which replaced the {old} in 2002."


COUNTRIES: tuple[Country, ...] = (
    _c("Japan", "Tokyo", "Tokyo is the capital of Japan and its most populous city.",
       "Japanese is the main language of Japan and is spoken by almost all of its people.", "yen",
       "Japan is an island country in East Asia, in the Pacific Ocean.",
       "The currency of Japan is the yen."),
    _c("France", "Paris", "Paris, on the River Seine, is the capital and largest city of France.",
       "French is the official language of France.", "euro",
       "France is a country in Western Europe.", _euro("France", "French franc")),
    _c("Germany", "Berlin", "Berlin is the capital of Germany and its largest city.",
       "German is the official language of Germany.", "euro",
       "Germany is a country in Central Europe.", _euro("Germany", "Deutsche Mark")),
    _c("Italy", "Rome", "Rome, on the River Tiber, is the capital and largest city of Italy.",
       "Italian is the official language of Italy.", "euro",
       "Italy is a country in Southern Europe.", _euro("Italy", "Italian lira")),
    _c("Spain", "Madrid", "Madrid is the capital of Spain and its largest city.",
       "Spanish, also called Castilian, is the official language of Spain.", "euro",
       "Spain is a country in southwestern Europe, on the Iberian Peninsula.", _euro("Spain", "Spanish peseta")),
    _c("Portugal", "Lisbon", "Lisbon, at the mouth of the River Tagus, is the capital and largest city of Portugal.",
       "Portuguese is the official language of Portugal.", "euro",
       "Portugal is a country on the Iberian Peninsula, in southwestern Europe.",
       _euro("Portugal", "Portuguese escudo")),
    _c("the United Kingdom", "London", "London, on the River Thames, is the capital of the United Kingdom.",
       "English is the main language of the United Kingdom.", "pound sterling",
       "The United Kingdom is an island country in northwestern Europe."),
    _c("the Netherlands", "Amsterdam", "Amsterdam is the capital and largest city of the Netherlands.",
       "Dutch is the official language of the Netherlands.", "euro",
       "The Netherlands is a country in northwestern Europe, on the North Sea.",
       _euro("The Netherlands", "Dutch guilder")),
    _c("Greece", "Athens", "Athens is the capital of Greece and one of the oldest cities in the world.",
       "Greek is the official language of Greece.", "euro",
       "Greece is a country in southeastern Europe.", _euro("Greece", "Greek drachma")),
    _c("Poland", "Warsaw", "Warsaw, on the River Vistula, is the capital and largest city of Poland.",
       "Polish is the official language of Poland.", "Polish zloty",
       "Poland is a country in Central Europe."),
    _c("Sweden", "Stockholm", "Stockholm is the capital of Sweden and its largest city.",
       "Swedish is the main language of Sweden.", "Swedish krona",
       "Sweden is a Nordic country in Northern Europe."),
    _c("Norway", "Oslo", "Oslo is the capital of Norway and its largest city.",
       "Norwegian is the main language of Norway and has two written forms, Bokmål and Nynorsk.",
       "Norwegian krone", "Norway is a Nordic country in Northern Europe, on the Scandinavian Peninsula."),
    _c("Denmark", "Copenhagen", "Copenhagen is the capital of Denmark and its largest city.",
       "Danish is the official language of Denmark.", "Danish krone",
       "Denmark is a Nordic country in Northern Europe."),
    _c("Finland", "Helsinki", "Helsinki is the capital of Finland and its largest city.",
       "Finland has two official languages, Finnish and Swedish.", "euro",
       "Finland is a Nordic country in Northern Europe.", _euro("Finland", "Finnish markka")),
    _c("Russia", "Moscow", "Moscow is the capital of Russia and its largest city.",
       "Russian is the official language of Russia.", "Russian ruble",
       "Russia spans Eastern Europe and Northern Asia and is the largest country in the world by area."),
    _c("China", "Beijing", "Beijing is the capital of China and the country's political and cultural centre.",
       "Standard Chinese, based on Mandarin, is the official language of China.", "renminbi",
       "China is a country in East Asia.",
       "The currency of China is the renminbi, whose basic unit is the yuan."),
    _c("South Korea", "Seoul", "Seoul is the capital of South Korea and its largest city.",
       "Korean is the official language of South Korea.", "South Korean won",
       "South Korea is a country in East Asia, on the southern part of the Korean Peninsula."),
    _c("India", "New Delhi", "New Delhi is the capital of India and the seat of its central government.",
       "Hindi and English are the official languages of the central government of India.", "Indian rupee",
       "India is a country in South Asia."),
    _c("Thailand", "Bangkok", "Bangkok is the capital of Thailand and its largest city.",
       "Thai is the official language of Thailand.", "Thai baht",
       "Thailand is a country in Southeast Asia."),
    _c("Vietnam", "Hanoi", "Hanoi, on the Red River, is the capital of Vietnam.",
       "Vietnamese is the official language of Vietnam.", "Vietnamese dong",
       "Vietnam is a country in Southeast Asia."),
    _c("Egypt", "Cairo", "Cairo, on the River Nile, is the capital and largest city of Egypt.",
       "Arabic is the official language of Egypt.", "Egyptian pound",
       "Egypt is a country in northeastern Africa."),
    _c("Kenya", "Nairobi", "Nairobi is the capital of Kenya and its largest city.",
       "Swahili and English are the official languages of Kenya.", "Kenyan shilling",
       "Kenya is a country in East Africa."),
    _c("Nigeria", "Abuja", "Abuja replaced Lagos as the capital of Nigeria in 1991.",
       "English is the official language of Nigeria.", "Nigerian naira",
       "Nigeria is a country in West Africa."),
    _c("Morocco", "Rabat", "Rabat is the capital of Morocco, although Casablanca is the country's largest city.",
       "Arabic and Berber are the official languages of Morocco.", "Moroccan dirham",
       "Morocco is a country in North Africa."),
    _c("Ghana", "Accra", "Accra, on the Gulf of Guinea, is the capital of Ghana.",
       "English is the official language of Ghana.", "Ghanaian cedi",
       "Ghana is a country in West Africa."),
    _c("the United States", "Washington, D.C.",
       "Washington, D.C. is the capital of the United States and the seat of its federal government.",
       "English is the most widely spoken language in the United States.", "United States dollar",
       "The United States is a country in North America."),
    _c("Canada", "Ottawa", "Ottawa, in the province of Ontario, is the capital of Canada.",
       "Canada has two official languages, English and French.", "Canadian dollar",
       "Canada is a country in North America."),
    _c("Mexico", "Mexico City", "Mexico City is the capital of Mexico and its largest city.",
       "Spanish is the most widely spoken language in Mexico.", "Mexican peso",
       "Mexico is a country in the southern part of North America."),
    _c("Brazil", "Brasília", "Brasília has been the capital of Brazil since 1960, when it replaced Rio de Janeiro.",
       "Portuguese is the official language of Brazil.", "Brazilian real",
       "Brazil is the largest country in South America."),
    _c("Argentina", "Buenos Aires", "Buenos Aires is the capital of Argentina and its largest city.",
       "Spanish is the main language of Argentina.", "Argentine peso",
       "Argentina is a country in the southern part of South America."),
    _c("Chile", "Santiago", "Santiago is the capital of Chile and its largest city.",
       "Spanish is the main language of Chile.", "Chilean peso",
       "Chile is a long, narrow country along the western edge of South America."),
    _c("Peru", "Lima", "Lima, on the Pacific coast, is the capital and largest city of Peru.",
       "Spanish is the most widely spoken language in Peru.", "Peruvian sol",
       "Peru is a country in western South America."),
    _c("Colombia", "Bogotá", "Bogotá is the capital of Colombia and its largest city.",
       "Spanish is the official language of Colombia.", "Colombian peso",
       "Colombia is a country in the northwest of South America."),
    _c("Australia", "Canberra", "Canberra is the capital of Australia; it was built as a compromise between "
       "Sydney and Melbourne.",
       "English is the main language of Australia.", "Australian dollar",
       "Australia is a country in Oceania that covers the mainland of the Australian continent."),
    _c("New Zealand", "Wellington", "Wellington, at the southern tip of the North Island, is the capital of "
       "New Zealand.",
       "English is the most widely spoken language in New Zealand, where Māori is also an official language.",
       "New Zealand dollar", "New Zealand is an island country in the southwestern Pacific Ocean."),
    _c("Turkey", "Ankara", "Ankara is the capital of Turkey, while Istanbul is its largest city.",
       "Turkish is the official language of Turkey.", "Turkish lira",
       "Turkey lies mostly in Western Asia, with a smaller part in southeastern Europe."),
    _c("Saudi Arabia", "Riyadh", "Riyadh is the capital of Saudi Arabia and its largest city.",
       "Arabic is the official language of Saudi Arabia.", "Saudi riyal",
       "Saudi Arabia is a country in Western Asia that covers most of the Arabian Peninsula."),
    _c("Iran", "Tehran", "Tehran is the capital of Iran and its largest city.",
       "Persian, also known as Farsi, is the official language of Iran.", "Iranian rial",
       "Iran is a country in Western Asia."),
    _c("Pakistan", "Islamabad", "Islamabad is the capital of Pakistan; it was built in the 1960s to replace Karachi.",
       "Urdu is the national language of Pakistan, and English is also an official language.", "Pakistani rupee",
       "Pakistan is a country in South Asia."),
    _c("Switzerland", "Bern", "Bern is the federal city of Switzerland and serves as its capital.",
       "Switzerland has four national languages: German, French, Italian and Romansh.", "Swiss franc",
       "Switzerland is a landlocked country in Central Europe, in the Alps."),
    _c("Austria", "Vienna", "Vienna, on the River Danube, is the capital and largest city of Austria.",
       "German is the official language of Austria.", "euro",
       "Austria is a landlocked country in Central Europe.", _euro("Austria", "Austrian schilling")),
    _c("Hungary", "Budapest", "Budapest, which lies on both banks of the Danube, is the capital of Hungary.",
       "Hungarian is the official language of Hungary.", "Hungarian forint",
       "Hungary is a landlocked country in Central Europe."),
    _c("the Czech Republic", "Prague", "Prague, on the River Vltava, is the capital of the Czech Republic.",
       "Czech is the official language of the Czech Republic.", "Czech koruna",
       "The Czech Republic is a landlocked country in Central Europe."),
    _c("the Philippines", "Manila", "Manila, on Manila Bay, is the capital of the Philippines.",
       "Filipino and English are the official languages of the Philippines.", "Philippine peso",
       "The Philippines is an island country in Southeast Asia."),
    _c("Cuba", "Havana", "Havana is the capital of Cuba and its largest city.",
       "Spanish is the official language of Cuba.", "Cuban peso",
       "Cuba is an island country in the Caribbean Sea."),
    _c("Ukraine", "Kyiv", "Kyiv, on the Dnipro River, is the capital and largest city of Ukraine.",
       "Ukrainian is the official language of Ukraine.", "Ukrainian hryvnia",
       "Ukraine is a country in Eastern Europe."),
    _c("Iceland", "Reykjavík", "Reykjavík is the capital of Iceland and its largest city.",
       "Icelandic is the official language of Iceland.", "Icelandic krona",
       "Iceland is an island country in the North Atlantic Ocean."),
    _c("Malaysia", "Kuala Lumpur", "Kuala Lumpur is the capital of Malaysia and its largest city.",
       "Malay is the official language of Malaysia.", "Malaysian ringgit",
       "Malaysia is a country in Southeast Asia."),
)

# (name, symbol, atomic number, Latin name the symbol comes from or "")
ELEMENTS: tuple[tuple[str, str, int, str], ...] = (
    ("hydrogen", "H", 1, ""), ("helium", "He", 2, ""), ("lithium", "Li", 3, ""), ("carbon", "C", 6, ""),
    ("nitrogen", "N", 7, ""), ("oxygen", "O", 8, ""), ("fluorine", "F", 9, ""), ("neon", "Ne", 10, ""),
    ("sodium", "Na", 11, "natrium"), ("magnesium", "Mg", 12, ""), ("aluminium", "Al", 13, ""),
    ("silicon", "Si", 14, ""), ("phosphorus", "P", 15, ""), ("sulfur", "S", 16, ""), ("chlorine", "Cl", 17, ""),
    ("potassium", "K", 19, "kalium"), ("calcium", "Ca", 20, ""), ("iron", "Fe", 26, "ferrum"),
    ("copper", "Cu", 29, "cuprum"), ("zinc", "Zn", 30, ""), ("silver", "Ag", 47, "argentum"),
    ("tin", "Sn", 50, "stannum"), ("gold", "Au", 79, "aurum"), ("mercury", "Hg", 80, "hydrargyrum"),
    ("lead", "Pb", 82, "plumbum"), ("uranium", "U", 92, ""),
)

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}

# group -> [(questions, passages)]: one fact each.
FACTS: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "planets": [
        (("Which planet is closest to the Sun?", "What is the nearest planet to the Sun?"),
         ("Mercury is the smallest planet in the Solar System and the one closest to the Sun.",)),
        (("What is the hottest planet in the Solar System?", "Which planet has the highest surface temperature?"),
         ("Venus is the hottest planet in the Solar System because its thick carbon dioxide atmosphere traps "
          "heat.",)),
        (("Which planet is known as the Red Planet?", "Why is Mars called the Red Planet?"),
         ("Mars is called the Red Planet because iron oxide on its surface gives it a reddish colour.",)),
        (("What is the largest planet in the Solar System?", "Which planet is the biggest?"),
         ("Jupiter is the largest planet in the Solar System, a gas giant about eleven times as wide as Earth.",)),
        (("Which planet is famous for its rings?", "What are Saturn's rings made of?"),
         ("Saturn is best known for its bright system of rings, which are made mostly of pieces of ice.",)),
        (("Which planet is farthest from the Sun?", "What is the most distant planet from the Sun?"),
         ("Neptune is the eighth planet from the Sun and the farthest known planet in the Solar System.",)),
        (("Which planet rotates on its side?", "What is unusual about the rotation of Uranus?"),
         ("Uranus rotates on its side: its axis is tilted by about 98 degrees.",)),
        (("How long does it take the Earth to orbit the Sun?", "How many days does the Earth need to go around "
          "the Sun?"),
         ("The Earth takes about 365.25 days to complete one orbit around the Sun.",)),
        (("How far away is the Moon?", "What is the distance from the Earth to the Moon?"),
         ("The Moon orbits the Earth at an average distance of about 384,400 kilometres.",)),
        (("How many moons does Mars have?", "What are the names of the moons of Mars?"),
         ("Mars has two small moons, Phobos and Deimos.",)),
    ],
    "animals": [
        (("What is the fastest land animal?", "Which animal can run the fastest?"),
         ("The cheetah is the fastest land animal and can reach about 100 kilometres per hour in short bursts.",)),
        (("What is the largest animal that has ever lived?", "What is the biggest animal in the world?"),
         ("The blue whale is the largest animal known to have ever lived.",)),
        (("What is the tallest animal?", "Which animal is the tallest in the world?"),
         ("The giraffe is the tallest living animal; adult males can be more than five metres tall.",)),
        (("What is the largest land animal?", "Which animal is the heaviest on land?"),
         ("The African elephant is the largest and heaviest living land animal.",)),
        (("What do giant pandas eat?", "What is the main food of pandas?"),
         ("Giant pandas eat almost nothing but bamboo.",)),
        (("Which mammals can fly?", "Are bats the only flying mammals?"),
         ("Bats are the only mammals capable of true, sustained flight.",)),
        (("How many hearts does an octopus have?", "Does an octopus have more than one heart?"),
         ("An octopus has three hearts: two pump blood through the gills and one pumps it around the body.",)),
        (("How many legs does a spider have?", "Do spiders have eight legs?"),
         ("Spiders have eight legs, while insects have six.",)),
        (("Where do penguins live?", "Can penguins fly?"),
         ("Penguins are flightless birds that live almost entirely in the Southern Hemisphere.",)),
        (("How do bees make honey?", "What do honey bees make honey from?"),
         ("Honey bees make honey from the nectar of flowers, which they store in wax cells in the hive.",)),
    ],
    "discoveries": [
        (("Who invented the telephone?", "Who patented the telephone?"),
         ("Alexander Graham Bell was granted the first United States patent for the telephone in 1876.",)),
        (("Who invented the printing press?", "Who introduced movable type printing to Europe?"),
         ("Johannes Gutenberg introduced printing with movable metal type to Europe around 1440.",)),
        (("Who invented the World Wide Web?", "When was the World Wide Web invented?"),
         ("Tim Berners-Lee invented the World Wide Web in 1989 while working at CERN.",)),
        (("Who discovered penicillin?", "When was penicillin discovered?"),
         ("Alexander Fleming discovered penicillin in 1928.",)),
        (("Who made the first powered aeroplane flight?", "Who flew the first aeroplane?"),
         ("The Wright brothers made the first controlled, powered aeroplane flight in 1903, near Kitty Hawk in "
          "North Carolina.",)),
        (("Who developed the theory of relativity?", "When did Einstein publish his theory of relativity?"),
         ("Albert Einstein published his special theory of relativity in 1905 and his general theory of "
          "relativity in 1915.",)),
        (("Who discovered radium?", "Which elements did Marie Curie discover?"),
         ("Marie and Pierre Curie discovered the elements polonium and radium in 1898.",)),
        (("Who described the law of universal gravitation?", "Who discovered gravity?"),
         ("Isaac Newton described the law of universal gravitation in his Principia, published in 1687.",)),
        (("Who discovered the structure of DNA?", "When was the double helix of DNA discovered?"),
         ("James Watson and Francis Crick described the double-helix structure of DNA in 1953, using X-ray "
          "images made by Rosalind Franklin.",)),
        (("Who developed the first vaccine?", "Who created the smallpox vaccine?"),
         ("Edward Jenner developed the first vaccine, against smallpox, in 1796.",)),
    ],
    "books": [
        (("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
         ("Pride and Prejudice is a novel by Jane Austen, first published in 1813.",)),
        (("Who wrote Nineteen Eighty-Four?", "Who is the author of the novel 1984?"),
         ("Nineteen Eighty-Four is a novel by George Orwell, published in 1949.",)),
        (("Who wrote Don Quixote?", "Who is the author of Don Quixote?"),
         ("Don Quixote is a Spanish novel by Miguel de Cervantes, whose first part was published in 1605.",)),
        (("Who wrote Hamlet?", "Who is the author of the play Hamlet?"),
         ("Hamlet is a tragedy written by William Shakespeare around 1600.",)),
        (("Who wrote War and Peace?", "Who is the author of War and Peace?"),
         ("War and Peace is a novel by Leo Tolstoy set in Russia during the Napoleonic Wars.",)),
        (("Who wrote On the Origin of Species?", "When was On the Origin of Species published?"),
         ("On the Origin of Species, by Charles Darwin, was published in 1859 and introduced the theory of "
          "evolution by natural selection.",)),
        (("Who wrote Moby-Dick?", "Who is the author of Moby-Dick?"),
         ("Moby-Dick is a novel by Herman Melville, published in 1851.",)),
        (("Who wrote the Odyssey?", "Who is the author of the Odyssey?"),
         ("The Odyssey is an ancient Greek epic poem traditionally attributed to Homer.",)),
        (("Who wrote Frankenstein?", "Who is the author of Frankenstein?"),
         ("Frankenstein is a novel by Mary Shelley, first published in 1818.",)),
        (("Who wrote One Hundred Years of Solitude?", "Who is the author of One Hundred Years of Solitude?"),
         ("One Hundred Years of Solitude is a novel by Gabriel García Márquez, published in 1967.",)),
        (("Who wrote the Divine Comedy?", "Who is the author of the Divine Comedy?"),
         ("The Divine Comedy is a long Italian poem by Dante Alighieri, completed in the early 14th century.",)),
    ],
    "geography": [
        (("What is the highest mountain in the world?", "How high is Mount Everest?"),
         ("Mount Everest, on the border between Nepal and China, is the highest mountain above sea level, at "
          "about 8,849 metres.",)),
        (("What is the largest ocean?", "Which ocean is the biggest?"),
         ("The Pacific is the largest and deepest of the Earth's oceans.",)),
        (("What is the largest hot desert in the world?", "How big is the Sahara?"),
         ("The Sahara is the largest hot desert in the world and covers much of North Africa.",)),
        (("What is the largest rainforest in the world?", "Where is the largest tropical rainforest?"),
         ("The Amazon rainforest in South America is the largest tropical rainforest in the world.",)),
        (("What is the deepest lake in the world?", "How deep is Lake Baikal?"),
         ("Lake Baikal in Siberia is the deepest lake in the world, at about 1,640 metres.",)),
        (("What is the largest island in the world?", "Which island is the biggest?"),
         ("Greenland is the largest island in the world that is not a continent.",)),
    ],
    "science": [
        (("At what temperature does water boil?", "What is the boiling point of water?"),
         ("At sea level, pure water boils at 100 degrees Celsius.",)),
        (("How many bones are in the human body?", "How many bones does an adult have?"),
         ("The skeleton of an adult human usually has 206 bones.",)),
        (("How fast does light travel?", "What is the speed of light?"),
         ("Light travels through a vacuum at about 299,792 kilometres per second.",)),
        (("How many chambers does the human heart have?", "What are the chambers of the heart?"),
         ("The human heart has four chambers: two atria and two ventricles.",)),
        (("What is photosynthesis?", "How do plants make their food?"),
         ("In photosynthesis, plants use the energy of sunlight to turn carbon dioxide and water into sugar and "
          "oxygen.",)),
        (("What is the largest organ of the human body?", "Which organ of the body is the biggest?"),
         ("The skin is the largest organ of the human body.",)),
        (("At what temperature does water freeze?", "What is the freezing point of water?"),
         ("Pure water freezes at 0 degrees Celsius at normal atmospheric pressure.",)),
    ],
}


# True statements that share an entity (or a topic) with facts above but answer none of their
# questions: "Kyoto was the imperial capital of Japan ..." for "What is the capital of Japan?".
# They only ever appear as negatives, and make the dev/test rankings hard for a zero-shot model.
DISTRACTORS: dict[str, tuple[str, ...]] = {
    "Japan": (
        "Kyoto was the imperial capital of Japan for more than a thousand years.",
        "Mount Fuji is the highest mountain in Japan.",
        "The Bank of Japan is the central bank of Japan.",
    ),
    "France": (
        "Versailles was the seat of the French royal court for most of the period from 1682 to 1789.",
        "Mont Blanc, on the border between France and Italy, is the highest mountain in the Alps.",
        "The Banque de France is the central bank of France.",
    ),
    "Germany": (
        "Bonn was the capital of West Germany from 1949 to 1990.",
        "The Zugspitze is the highest mountain in Germany.",
        "The Deutsche Bundesbank is the central bank of Germany.",
    ),
    "Italy": (
        "Latin was the language of ancient Rome.",
        "Turin was the first capital of the unified Kingdom of Italy, from 1861 to 1865.",
        "The Bank of Italy is the central bank of Italy.",
    ),
    "Spain": (
        "Barcelona is the second-largest city in Spain.",
        "The Bank of Spain is the central bank of Spain.",
    ),
    "Portugal": (
        "Porto, known for port wine, is a major city in northern Portugal.",
        "The Bank of Portugal is the central bank of Portugal.",
    ),
    "the United Kingdom": (
        "The United Kingdom left the European Union in 2020.",
        "Edinburgh is the capital of Scotland, one of the four countries of the United Kingdom.",
        "Ben Nevis, in Scotland, is the highest mountain in the United Kingdom.",
        "The Bank of England is the central bank of the United Kingdom.",
    ),
    "the Netherlands": (
        "The Hague is the seat of the Dutch government and parliament.",
        "De Nederlandsche Bank is the central bank of the Netherlands.",
    ),
    "Greece": (
        "The Greek alphabet has 24 letters.",
        "Thessaloniki is the second-largest city in Greece.",
        "Mount Olympus is the highest mountain in Greece.",
    ),
    "Poland": (
        "Poland joined the European Union in 2004 but has not adopted the euro.",
        "Kraków was the capital of Poland until the end of the 16th century.",
        "The National Bank of Poland is the central bank of Poland.",
    ),
    "Sweden": (
        "Sweden voted against adopting the euro in a referendum in 2003.",
        "Gothenburg is the second-largest city in Sweden.",
        "Sveriges Riksbank, the central bank of Sweden, is one of the oldest central banks in the world.",
    ),
    "Norway": (
        "Norwegian voters rejected membership of the European Union in 1972 and 1994.",
        "Bergen is the second-largest city in Norway.",
        "Norges Bank is the central bank of Norway.",
    ),
    "Denmark": (
        "Denmark negotiated an opt-out from adopting the euro.",
        "Aarhus is the second-largest city in Denmark.",
        "Danmarks Nationalbank is the central bank of Denmark.",
    ),
    "Finland": (
        "Turku is the oldest city in Finland.",
        "The Bank of Finland is the central bank of Finland.",
    ),
    "Russia": (
        "Saint Petersburg was the capital of the Russian Empire for most of the period from 1712 to 1918.",
        "The Bank of Russia is the central bank of Russia.",
    ),
    "China": (
        "Chinese characters have been in use for more than three thousand years.",
        "Nanjing served as the capital of China under several dynasties and governments.",
        "Shanghai is the largest city in China.",
        "The People's Bank of China is the central bank of China.",
    ),
    "South Korea": (
        "Busan is the second-largest city in South Korea.",
        "The Bank of Korea is the central bank of South Korea.",
    ),
    "India": (
        "Sanskrit is a classical language of India.",
        "Kolkata, then called Calcutta, was the capital of British India until 1911.",
        "Mumbai is the financial centre of India.",
        "The Reserve Bank of India is the central bank of India.",
    ),
    "Thailand": (
        "Ayutthaya was the capital of the Kingdom of Siam for more than four hundred years.",
        "The Bank of Thailand is the central bank of Thailand.",
    ),
    "Vietnam": (
        "Ho Chi Minh City is the largest city in Vietnam.",
        "Hue was the capital of Vietnam under the Nguyen dynasty.",
    ),
    "Egypt": (
        "Alexandria, founded by Alexander the Great, is the second-largest city in Egypt.",
        "The pyramids of Giza in Egypt were built as tombs for pharaohs.",
    ),
    "Kenya": (
        "Mombasa is the main port of Kenya.",
        "Mount Kenya is the highest mountain in Kenya.",
    ),
    "Nigeria": (
        "Lagos is the largest city in Nigeria.",
    ),
    "Morocco": (
        "Casablanca is the largest city in Morocco.",
        "Marrakesh was the capital of several Moroccan dynasties.",
    ),
    "Ghana": (
        "Kumasi is the capital of the Ashanti Region of Ghana.",
        "The Bank of Ghana is the central bank of Ghana.",
    ),
    "the United States": (
        "Philadelphia served as the temporary capital of the United States from 1790 to 1800.",
        "New York City is the most populous city in the United States.",
        "The Federal Reserve is the central bank of the United States.",
    ),
    "Canada": (
        "Toronto is the largest city in Canada.",
        "Quebec City is the capital of the Canadian province of Quebec.",
        "The Bank of Canada is the central bank of Canada.",
    ),
    "Mexico": (
        "Monterrey is a large industrial city in northern Mexico.",
        "The Bank of Mexico is the central bank of Mexico.",
    ),
    "Brazil": (
        "Rio de Janeiro was the capital of Brazil until 1960.",
        "São Paulo is the largest city in Brazil.",
    ),
    "Argentina": (
        "Córdoba is the second-largest city in Argentina.",
        "Aconcagua, in Argentina, is the highest mountain in the Americas.",
    ),
    "Chile": (
        "Valparaíso is home to the National Congress of Chile.",
        "The Atacama Desert in northern Chile is one of the driest places on Earth.",
    ),
    "Peru": (
        "Cusco was the capital of the Inca Empire.",
        "Machu Picchu is a 15th-century Inca citadel in the Andes of Peru.",
    ),
    "Colombia": (
        "Medellín is the second-largest city in Colombia.",
        "Cartagena is a port city on the Caribbean coast of Colombia.",
    ),
    "Australia": (
        "Melbourne was the seat of the Australian federal government from 1901 to 1927.",
        "Sydney is the oldest city in Australia.",
        "The Reserve Bank of Australia is the central bank of Australia.",
    ),
    "New Zealand": (
        "Auckland is the largest city in New Zealand.",
        "Auckland was the capital of New Zealand from 1841 to 1865.",
    ),
    "Turkey": (
        "Istanbul, formerly Constantinople, was the capital of the Ottoman Empire.",
        "The Central Bank of the Republic of Turkey is the central bank of Turkey.",
    ),
    "Saudi Arabia": (
        "Jeddah is a major port city on the Red Sea coast of Saudi Arabia.",
        "Mecca, in Saudi Arabia, is the holiest city in Islam.",
    ),
    "Iran": (
        "Isfahan was the capital of Persia under the Safavid dynasty.",
        "Mount Damavand is the highest mountain in Iran.",
    ),
    "Pakistan": (
        "Karachi was the first capital of Pakistan and is its largest city.",
        "The State Bank of Pakistan is the central bank of Pakistan.",
    ),
    "Switzerland": (
        "Switzerland is not a member of the European Union.",
        "Zurich is the largest city in Switzerland.",
        "Geneva is home to the European headquarters of the United Nations.",
        "The Swiss National Bank is the central bank of Switzerland.",
    ),
    "Austria": (
        "Graz is the second-largest city in Austria.",
        "Salzburg, in Austria, is the birthplace of Wolfgang Amadeus Mozart.",
    ),
    "Hungary": (
        "Hungary joined the European Union in 2004 but has not adopted the euro.",
        "Lake Balaton in Hungary is the largest lake in Central Europe.",
        "The Hungarian National Bank is the central bank of Hungary.",
    ),
    "the Czech Republic": (
        "The Czech Republic joined the European Union in 2004 but has not adopted the euro.",
        "Brno is the second-largest city in the Czech Republic.",
        "The Czech National Bank is the central bank of the Czech Republic.",
    ),
    "the Philippines": (
        "Quezon City is the most populous city in the Philippines and was the national capital from 1948 to 1976.",
    ),
    "Cuba": (
        "Santiago de Cuba is the second-largest city in Cuba.",
    ),
    "Ukraine": (
        "Kharkiv was the capital of Soviet Ukraine from 1919 to 1934.",
        "Lviv is a major cultural centre in western Ukraine.",
    ),
    "Iceland": (
        "Iceland is not a member of the European Union.",
        "The Althing, the parliament of Iceland, was founded in 930 and is one of the oldest parliaments in the world.",
    ),
    "Malaysia": (
        "Putrajaya is the administrative centre of the federal government of Malaysia.",
        "Bank Negara Malaysia is the central bank of Malaysia.",
    ),
    # elements
    "hydrogen": (
        "Hydrogen is the most abundant element in the universe.",
    ),
    "helium": (
        "Helium is lighter than air and is used to fill balloons.",
    ),
    "lithium": (
        "Lithium is used in rechargeable batteries.",
    ),
    "carbon": (
        "Diamond and graphite are both forms of pure carbon.",
    ),
    "nitrogen": (
        "Nitrogen makes up about 78 percent of the Earth's atmosphere.",
    ),
    "oxygen": (
        "Oxygen makes up about 21 percent of the Earth's atmosphere.",
    ),
    "fluorine": (
        "Fluorine is the most reactive of all the chemical elements.",
    ),
    "neon": (
        "Neon glows a bright reddish orange in advertising signs.",
    ),
    "sodium": (
        "Sodium and chlorine together form sodium chloride, or table salt.",
    ),
    "magnesium": (
        "Magnesium burns with a brilliant white flame.",
    ),
    "aluminium": (
        "Aluminium is the most abundant metal in the Earth's crust.",
    ),
    "silicon": (
        "Silicon is widely used to make computer chips.",
    ),
    "phosphorus": (
        "Phosphorus was discovered in 1669 by the German alchemist Hennig Brand.",
    ),
    "sulfur": (
        "Sulfur is a yellow solid that is often found near volcanoes.",
    ),
    "chlorine": (
        "Chlorine is used to disinfect drinking water and swimming pools.",
    ),
    "potassium": (
        "Potassium is a soft metal that reacts strongly with water.",
    ),
    "calcium": (
        "Calcium is an important part of bones and teeth.",
    ),
    "iron": (
        "Iron is the main component of steel.",
    ),
    "copper": (
        "Copper is an excellent conductor of electricity and is used in electrical wiring.",
    ),
    "zinc": (
        "Zinc is used to coat steel to protect it from rust.",
    ),
    "silver": (
        "Silver conducts electricity better than any other metal.",
    ),
    "tin": (
        "Tin is mixed with copper to make bronze.",
    ),
    "gold": (
        "Gold is a soft, dense metal that does not tarnish.",
    ),
    "mercury": (
        "Mercury is the only metal that is liquid at room temperature.",
    ),
    "lead": (
        "Lead is a heavy, soft metal that was once widely used for water pipes.",
    ),
    "uranium": (
        "Uranium is used as fuel in nuclear power stations.",
    ),
    # topics of the other facts
    "facts:planets": (
        "Pluto was reclassified as a dwarf planet in 2006.",
        "Jupiter has more than ninety known moons.",
        "Venus rotates in the opposite direction to most planets.",
    ),
    "facts:animals": (
        "The blue whale feeds mainly on tiny crustaceans called krill.",
        "Emperor penguins are the largest living species of penguin.",
    ),
    "facts:discoveries": (
        "Thomas Edison developed a long-lasting incandescent light bulb in 1879.",
        "Alexander Graham Bell was born in Edinburgh, Scotland, in 1847.",
    ),
    "facts:books": (
        "Romeo and Juliet is a tragedy by William Shakespeare.",
        "Jane Austen's novel Emma was published in 1815.",
        "Animal Farm is a novella by George Orwell, published in 1945.",
    ),
    "facts:geography": (
        "K2 is the second-highest mountain in the world.",
        "The Atlantic is the second-largest of the Earth's oceans.",
    ),
    "facts:science": (
        "Water is made of hydrogen and oxygen.",
        "The human heart beats about 100,000 times a day.",
    ),
}


@dataclass(frozen=True)
class _Fact:
    stratum: str  # hold-out stratum: "country:capital", "element:symbol", "facts:planets"...
    entity: str  # facts of the same entity are hard negatives of each other
    questions: tuple[str, ...]
    passages: tuple[str, ...]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _knowledge_base() -> list[_Fact]:
    facts: list[_Fact] = []
    currency_templates = ("The currency of {n} is the {c}.", "The official currency of {n} is the {c}.",
                          "{N} uses the {c} as its currency.", "In {n}, people pay with the {c}.")
    for i, c in enumerate(COUNTRIES):
        n, N = c.name, _cap(c.name)
        facts.append(_Fact("country:capital", n, (
            f"What is the capital of {n}?", f"Which city is the capital of {n}?",
            f"What is the capital city of {n}?", f"What city is {_possessive(n)} capital?",
            f"{c.capital} is the capital of which country?"), (c.capital_passage,)))
        currency = c.currency_passage or currency_templates[i % len(currency_templates)].format(n=n, N=N, c=c.currency)
        facts.append(_Fact("country:currency", n, (
            f"What is the currency of {n}?", f"What currency is used in {n}?",
            f"What money do people use in {n}?", f"What is {_possessive(n)} currency?"), (currency,)))
        facts.append(_Fact("country:language", n, (
            f"What language is spoken in {n}?", f"What is the official language of {n}?",
            f"Which language do people speak in {n}?", f"What language do they speak in {n}?"),
            (c.language_passage,)))
        facts.append(_Fact("country:location", n, (
            f"Where is {n} located?", f"On which continent is {n}?",
            f"In which part of the world is {n}?", f"Where is {n}?"), (c.location_passage,)))
    for name, symbol, number, latin in ELEMENTS:
        if latin:
            symbol_passage = f"The chemical symbol for {name} is {symbol}, from its Latin name {latin}."
        else:
            symbol_passage = f"The chemical symbol for {name} is {symbol}."
        protons = _NUMBER_WORDS.get(number, str(number))
        number_passage = (f"{_cap(name)} has the atomic number {number}, so every {name} atom has {protons} "
                          f"{'proton' if number == 1 else 'protons'} in its nucleus.")
        facts.append(_Fact("element:symbol", name, (
            f"What is the chemical symbol for {name}?", f"Which element has the symbol {symbol}?",
            f"What is the symbol of {name} in the periodic table?"), (symbol_passage,)))
        facts.append(_Fact("element:number", name, (
            f"What is the atomic number of {name}?", f"Which element has atomic number {number}?",
            f"How many protons does {'an' if name[0] in 'aeiou' else 'a'} {name} atom have?"), (number_passage,)))
    for group, entries in FACTS.items():
        for j, (questions, passages) in enumerate(entries):
            facts.append(_Fact(f"facts:{group}", f"{group}:{j}", questions, passages))
    return facts


def build_rerank(seed: int = SEED, n_train: int = 250, n_dev: int = 60, n_test: int = 60) -> dict[str, pd.DataFrame]:
    """Reranking splits: ``train`` positive pairs; ``dev``/``test`` one query per held-out fact.

    Facts are held out per stratum (country capitals, element symbols, planet facts...), so every
    question pattern appears in train while dev/test ask about other entities.
    """
    rng = random.Random(seed + 1)
    facts = _knowledge_base()
    strata: dict[str, list[_Fact]] = {}
    for fact in facts:
        strata.setdefault(fact.stratum, []).append(fact)
    held: dict[str, list[_Fact]] = {"dev": [], "test": []}
    train: list[_Fact] = []
    frac_dev, frac_test = n_dev / len(facts), n_test / len(facts)
    for items in strata.values():
        items = list(items)
        rng.shuffle(items)
        k_dev, k_test = max(1, round(len(items) * frac_dev)), max(1, round(len(items) * frac_test))
        held["test"].extend(items[:k_test])
        held["dev"].extend(items[k_test:k_test + k_dev])
        train.extend(items[k_test + k_dev:])

    all_passages = sorted({p for fact in facts for p in fact.passages} | {p for ds in DISTRACTORS.values() for p in ds})

    def hard_negatives(fact: _Fact, k_related: int, k_entity: int, k_kind: int) -> list[str]:
        """True statements about the same entity or topic, other attributes of the same entity, the same
        attribute of other entities (of the fact's own split: held-out answers never reach train)."""
        related = list(DISTRACTORS.get(fact.entity, ())) + list(DISTRACTORS.get(fact.stratum, ()))
        same_entity = [p for f in facts if f.entity == fact.entity and f is not fact for p in f.passages]
        same_kind = [p for f in strata[fact.stratum] if f is not fact for p in f.passages]
        negatives: list[str] = []
        for pool, k in ((related, k_related), (same_entity, k_entity), (same_kind, k_kind)):
            pool = [p for p in pool if p not in fact.passages and p not in negatives]
            negatives.extend(rng.sample(pool, min(k, len(pool))))
        return negatives

    # train: one question per fact, then extra phrasings until n_train rows; each with labelled hard
    # negatives, as real reranking sets (WikiQA, QNLI) label the non-answering sentences of a passage.
    held_passages = {p for split in held.values() for fact in split for p in fact.passages}
    first, extra = [], []
    for fact in train:
        order = list(range(len(fact.questions)))
        rng.shuffle(order)
        pairs = [(fact, fact.questions[q], fact.passages[q % len(fact.passages)]) for q in order]
        first.append(pairs[0])
        extra.extend(pairs[1:])
    rng.shuffle(extra)
    train_rows = first + extra[:max(0, n_train - len(first))]
    rng.shuffle(train_rows)
    out = {
        "train": pd.DataFrame(
            [(q, p, [n for n in hard_negatives(fact, 2, 1, 1) if n not in held_passages]) for fact, q, p in train_rows],
            columns=["query", "positive", "negative"],
        )
    }

    for split in ("dev", "test"):
        rows = []
        for fact in held[split]:
            query = rng.choice(fact.questions)
            positives = list(fact.passages)
            n_neg = rng.randint(10, 15)
            negatives = hard_negatives(fact, 4, 3, 5)[:n_neg]
            pool = [p for p in all_passages if p not in positives and p not in negatives]  # easy: anything else
            negatives.extend(rng.sample(pool, n_neg - len(negatives)))
            rng.shuffle(negatives)
            rows.append({"query": query, "positive": positives, "negative": negatives})
        rng.shuffle(rows)
        out[split] = pd.DataFrame(rows, columns=["query", "positive", "negative"])
    return out


# ============================================================================================
# Writing
# ============================================================================================

def write_demo_data(out_dir: str | Path) -> dict[str, str]:
    """Write the demo dataset as Parquet files under ``out_dir`` and return their paths.

    Keys: ``nli_train``, ``nli_dev``, ``nli_test``, ``rerank_train``, ``rerank_dev``,
    ``rerank_test``. Files are ``<out_dir>/nli/{train,dev,test}.parquet`` and
    ``<out_dir>/rerank/{train,dev,test}.parquet``; existing files are overwritten.
    """
    out = Path(out_dir)
    paths: dict[str, str] = {}
    for task, frames in (("nli", build_nli()), ("rerank", build_rerank())):
        (out / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev", "test"):
            path = out / task / f"{split}.parquet"
            frames[split].to_parquet(path, index=False, engine="pyarrow")
            paths[f"{task}_{split}"] = str(path)
    return paths


def _main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m ce_ray.demo.data OUT_DIR", file=sys.stderr)
        return 2
    paths = write_demo_data(argv[0])
    for key, path in paths.items():
        print(f"{key:13s} {len(pd.read_parquet(path)):5d} rows  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
