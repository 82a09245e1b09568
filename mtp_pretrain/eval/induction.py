"""Induction on two-token names (Gloeckle et al. 2024, section 4.1).

Stories mention their characters several times. Each character gets a fresh random name that
spans exactly two tokens of the tokenizer under evaluation; at every occurrence after the first,
the model sees the name's first token and must predict its second one, which it can only know by
looking back at an earlier occurrence (an induction head). First occurrences are not scored.

Story source: no story corpus is available offline here (no dataset hub, none shipped in an
installed package), so stories come from the small template generator below: children's-story
sentences about 2-3 characters (animals or children), places, objects and feelings. The same
generator provides training text (`training_stories`) so that a small model can be pretrained
on the kind of prose it is evaluated on.

Tokenizer contract: any object with `encode(str) -> list[int]` and `decode(list[int]) -> str`;
`encode` must not append special tokens at the end. Names are placed after a space and never at
the start of a story, and every occurrence is verified in context: the story's tokens must
contain the name as exactly two tokens (space included, as BPE tokenizers attach it to the
word), identical at all occurrences, at token boundaries that match the characters, and the
name's first token must occur nowhere else in the story, so that it identifies the name.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------------------------------------
# Story generator. Sentences use {0}, {1}, ... for characters (always after a space) and
# {obj}, {place}, {feeling}, {animal} for words drawn once per sentence.

KINDS = ("girl", "boy", "cat", "dog", "rabbit", "bird", "bear", "fox", "mouse", "frog")
PLACES = ("park", "forest", "beach", "garden", "village", "farm", "river", "school", "meadow",
          "hill", "lake", "barn")
OBJECTS = ("ball", "kite", "red box", "shiny stone", "little boat", "book", "hat", "apple",
           "cake", "key", "blue cup", "drum")
FEELINGS = ("happy", "sad", "scared", "excited", "tired", "curious", "proud", "surprised")
ANIMALS = ("dog", "duck", "cow", "owl", "turtle", "squirrel", "goat", "butterfly")

OPENINGS = ("Once upon a time,", "One sunny day,", "Long ago,", "In a small town,")
INTRODUCTIONS = (" there was a little {kind} named {0}. {0} liked to play near the {place}.",
                 " a {kind} named {0} lived by the {place}. Everyone knew {0} well.")
FRIEND_INTRODUCTIONS = (" {0} had a friend, a {kind} named {1}.",
                        " One morning, {0} met a {kind} named {1}.",
                        " Near the {place} lived a {kind} named {1}, who was friends with {0}.")
SENTENCES = (
    " One day, {0} found a {obj} near the {place}.",
    " {0} wanted to show the {obj} to {1}.",
    " \"Look what I found!\" said {0}.",
    " {1} smiled at {0} and said, \"Let us play together.\"",
    " {0} and {1} ran to the {place}.",
    " {0} felt {feeling}.",
    " {1} asked {0}, \"Can I hold the {obj}?\"",
    " {0} gave the {obj} to {1}.",
    " Then {0} saw a big {animal} by the {place}.",
    " {1} helped {0} carry the {obj} home.",
    " {0} laughed, and {1} laughed too.",
    " It started to rain, so {0} and {1} hid under a tree.",
    " {0} was {feeling} because the {obj} was gone.",
    " {1} looked everywhere for the {obj} with {0}.",
    " The {animal} came closer, and {0} held the hand of {1}.",
    " {0} told {1} a story about a {animal}.",
)
ENDINGS = (" At the end of the day, {0} and {1} went home.",
           " From that day on, {0} and {1} were best friends.",
           " {0} said goodnight to {1} and went to sleep.",
           " {1} hugged {0}, and they both felt {feeling}.")

_CHARACTER = re.compile(r"\{(\d)\}")


@dataclass(frozen=True)
class StoryTemplate:
    """A story as text pieces alternating with character indices: ("Once ... named ", 0, ...)."""

    parts: tuple[str | int, ...]
    n_characters: int

    def fill(self, names: Sequence[str]) -> tuple[str, list[tuple[int, int, int]]]:
        """The story text with `names` in place, and each occurrence as (start, end, character)
        with text[start:end] == names[character]."""
        pieces, occurrences, pos = [], [], 0
        for part in self.parts:
            piece = part if isinstance(part, str) else names[part]
            if isinstance(part, int):
                occurrences.append((pos, pos + len(piece), part))
            pieces.append(piece)
            pos += len(piece)
        return "".join(pieces), occurrences


def _fill_words(sentence: str, rng: random.Random, roles: Sequence[int]) -> str:
    words = {"{obj}": rng.choice(OBJECTS), "{place}": rng.choice(PLACES),
             "{feeling}": rng.choice(FEELINGS), "{animal}": rng.choice(ANIMALS),
             "{kind}": rng.choice(KINDS)}
    for slot, word in words.items():
        sentence = sentence.replace(slot, word)
    # Map the sentence's roles {0}, {1} to story characters, keeping the {k} form.
    return _CHARACTER.sub(lambda m: "{%d}" % roles[int(m.group(1))], sentence)


def generate_story(rng: random.Random, n_characters: int | None = None,
                   n_sentences: int | None = None) -> StoryTemplate:
    """A random story about 2-3 characters with 6-10 body sentences (unless given)."""
    n_characters = n_characters or rng.randint(2, 3)
    n_sentences = n_sentences or rng.randint(6, 10)
    text = rng.choice(OPENINGS) + _fill_words(rng.choice(INTRODUCTIONS), rng, [0])
    for i in range(1, n_characters):
        text += _fill_words(rng.choice(FRIEND_INTRODUCTIONS), rng, [0, i])
    for sentence in [*rng.choices(SENTENCES, k=n_sentences), rng.choice(ENDINGS)]:
        text += _fill_words(sentence, rng, rng.sample(range(n_characters), 2))
    # re.split with a group alternates text pieces and captured character indices.
    pieces = _CHARACTER.split(text)
    parts = tuple(p if i % 2 == 0 else int(p) for i, p in enumerate(pieces) if p or i % 2)
    return StoryTemplate(parts=parts, n_characters=n_characters)


# ---------------------------------------------------------------------------------------------
# Names.

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def random_name(rng: random.Random) -> str:
    """A capitalised string of 1-3 consonant-vowel syllables, sometimes closed by a consonant."""
    name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
                   for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.3:
        name += rng.choice(_CONSONANTS)
    return name.capitalize()


def _name_tokens(tokenizer: Tokenizer, context: str, name: str) -> list[int] | None:
    """The tokens that ' name' adds after `context`, or None if it alters context's tokens."""
    base = tokenizer.encode(context)
    ids = tokenizer.encode(context + " " + name)
    return ids[len(base):] if ids[:len(base)] == base else None


def pick_names(tokenizer: Tokenizer, n: int, rng: random.Random,
               max_tries: int = 10_000) -> list[str]:
    """`n` distinct random names that take exactly two tokens after a space, with distinct first
    tokens (a first token must identify its name)."""
    context = "Once upon a time, there was a girl named"
    names: list[str] = []
    first_tokens: set[int] = set()
    for _ in range(max_tries):
        name = random_name(rng)
        tokens = _name_tokens(tokenizer, context, name)
        if tokens is None or len(tokens) != 2 or tokens[0] in first_tokens or name in names:
            continue
        names.append(name)
        first_tokens.add(tokens[0])
        if len(names) == n:
            return names
    raise RuntimeError(f"found only {len(names)} of {n} two-token names in {max_tries} tries")


# ---------------------------------------------------------------------------------------------
# Examples.


@dataclass(frozen=True)
class InductionExample:
    text: str
    names: tuple[str, ...]
    token_ids: list[int]
    # Positions p of a name's second token at a later occurrence: the model must predict
    # token_ids[p] from token_ids[:p], whose last token is the name's first token.
    targets: list[int]


def _locate(tokenizer: Tokenizer, text: str, token_ids: list[int],
            occurrences: list[tuple[int, int, int]]) -> list[tuple[int, int]] | None:
    """Token position of each occurrence's first token and its character, or None if some
    occurrence is not exactly two tokens of its own, the same two at every occurrence, and
    whose first token appears only at occurrences."""
    located = []
    tokens_of: dict[int, list[int]] = {}
    for start, end, character in occurrences:
        before = tokenizer.encode(text[:start - 1])  # up to the space every name follows
        through = tokenizer.encode(text[:end])
        if (token_ids[:len(through)] != through or through[:len(before)] != before
                or len(through) - len(before) != 2):
            return None
        if tokens_of.setdefault(character, through[len(before):]) != through[len(before):]:
            return None
        located.append((len(before), character))
    first_token_positions = {p for p, _ in located}
    first_tokens = {t[0] for t in tokens_of.values()}
    if any(t in first_tokens and p not in first_token_positions for p, t in enumerate(token_ids)):
        return None
    return located


def make_example(tokenizer: Tokenizer, story: StoryTemplate, rng: random.Random,
                 max_tries: int = 100) -> InductionExample:
    """Fill `story` with fresh two-token names, retrying names until the in-context checks hold."""
    for _ in range(max_tries):
        names = pick_names(tokenizer, story.n_characters, rng)
        text, occurrences = story.fill(names)
        token_ids = tokenizer.encode(text)
        located = _locate(tokenizer, text, token_ids, occurrences)
        if located is None:
            continue
        seen: set[int] = set()
        targets = []
        for position, character in located:
            if character in seen:
                targets.append(position + 1)
            seen.add(character)
        return InductionExample(text=text, names=tuple(names), token_ids=token_ids,
                                targets=targets)
    raise RuntimeError(f"no names fit the story in context after {max_tries} tries")


def make_examples(tokenizer: Tokenizer, n_stories: int, seed: int = 0) -> list[InductionExample]:
    """`n_stories` evaluation stories, deterministic given the seed and the tokenizer."""
    rng = random.Random(seed)
    return [make_example(tokenizer, generate_story(rng), rng) for _ in range(n_stories)]


def training_stories(n: int, seed: int = 0) -> list[str]:
    """`n` stories with random names (of any token length): pretraining text for the task.
    Each is a single line."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        story = generate_story(rng)
        names: list[str] = []
        while len(names) < story.n_characters:
            name = random_name(rng)
            if name not in names:
                names.append(name)
        stories.append(story.fill(names)[0])
    return stories


# ---------------------------------------------------------------------------------------------
# Scoring.


def score_batched(examples: Sequence[InductionExample],
                  batch_logits: Callable[[list[list[int]]], Sequence[torch.Tensor]],
                  batch_size: int = 16) -> float:
    """Accuracy of predicting the second token of names at their later occurrences.

    `batch_logits(sequences)` returns, for each sequence, logits of shape [len, V] whose row t
    predicts token t+1. Ties count fractionally (a hit shared by m maximal logits counts 1/m),
    which is the expected accuracy of argmax with random tie-breaking: a constant model scores
    exactly 1/V.
    """
    hits, total = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        for example, logits in zip(batch, batch_logits([e.token_ids for e in batch])):
            if not example.targets:
                continue
            rows = logits[[p - 1 for p in example.targets]].float()
            target = torch.tensor([example.token_ids[p] for p in example.targets])
            is_max = rows == rows.max(dim=-1, keepdim=True).values
            hits += (is_max.gather(1, target[:, None]).squeeze(1) / is_max.sum(-1)).sum().item()
            total += len(example.targets)
    return hits / total


def score(examples: Sequence[InductionExample],
          next_token_logits: Callable[[list[int]], torch.Tensor]) -> float:
    """`score_batched` for a model that takes one sequence at a time."""
    return score_batched(examples, lambda seqs: [next_token_logits(s) for s in seqs])
