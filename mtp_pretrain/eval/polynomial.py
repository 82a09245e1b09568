"""Polynomial arithmetic over F7[X]/(X^5) (Gloeckle et al. 2024, section 4.2).

An element of the ring is a polynomial of degree at most 4 with coefficients mod 7; it is stored
as its coefficient tuple (c0, c1, c2, c3, c4). Expressions combine random polynomials with unary
negation, addition, multiplication and composition (p∘q = p(q(X))); every intermediate result is
reduced to that canonical form (coefficients mod 7, terms of degree >= 5 dropped).

Composition is evaluated on the canonical representatives. It agrees with composition in the
quotient ring whenever the inner polynomial has no constant term; otherwise "the" ring composition
is not well defined and this rule is simply the task's definition.

Text format, one example per line in training documents::

    prompt:  ((3x^2+1)*(x+4))∘(2x)=
    answer:  3x^3+6x^2+2x+4           (canonical: see `format_poly`)

Every operand of an operator is parenthesised, so the prompt parses without precedence rules.
The answer never contains spaces, which makes exact match on the first whitespace-delimited word
of a completion meaningful.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

MODULUS = 7
N_COEFFS = 5  # degrees 0..4: we work modulo X^5
OPERATIONS = ("neg", "add", "mul", "compose")
OP_SYMBOLS = {"add": "+", "mul": "*", "compose": "∘"}

Poly = tuple[int, ...]  # (c0, ..., c4), each in [0, 7)


# ---------------------------------------------------------------------------------------------
# Ring arithmetic on coefficient tuples.


def _reduce(coeffs: Sequence[int]) -> Poly:
    """Canonical form: coefficients mod 7, degrees >= 5 dropped, padded to length 5."""
    out = [c % MODULUS for c in coeffs[:N_COEFFS]]
    return tuple(out + [0] * (N_COEFFS - len(out)))


def poly_neg(p: Poly) -> Poly:
    return _reduce([-c for c in p])


def poly_add(p: Poly, q: Poly) -> Poly:
    return _reduce([a + b for a, b in zip(p, q)])


def poly_mul(p: Poly, q: Poly) -> Poly:
    out = [0] * N_COEFFS
    for i, a in enumerate(p):
        for j, b in enumerate(q[: N_COEFFS - i]):
            out[i + j] += a * b
    return _reduce(out)


def poly_compose(p: Poly, q: Poly) -> Poly:
    """p(q(X)) by Horner's rule, truncating after every step."""
    out: Poly = _reduce([])
    for c in reversed(p):
        out = poly_add(poly_mul(out, q), _reduce([c]))
    return out


def format_poly(p: Poly, var: str = "x") -> str:
    """Canonical text: terms by decreasing degree, '+'-separated, no spaces; coefficient 1 is
    omitted except on the constant, x^1 is written x, and the zero polynomial is '0'."""
    terms = []
    for degree in range(N_COEFFS - 1, -1, -1):
        c = p[degree]
        if c == 0:
            continue
        if degree == 0:
            terms.append(str(c))
            continue
        monomial = var if degree == 1 else f"{var}^{degree}"
        terms.append(monomial if c == 1 else f"{c}{monomial}")
    return "+".join(terms) if terms else "0"


# ---------------------------------------------------------------------------------------------
# Expression trees.


@dataclass(frozen=True)
class Expr:
    """A leaf polynomial (op is None) or an operation applied to one or two sub-expressions."""

    op: str | None = None
    poly: Poly | None = None
    args: tuple["Expr", ...] = ()

    @property
    def n_ops(self) -> int:
        return (self.op is not None) + sum(a.n_ops for a in self.args)

    def evaluate(self) -> Poly:
        if self.op is None:
            return self.poly
        values = [a.evaluate() for a in self.args]
        if self.op == "neg":
            return poly_neg(values[0])
        return {"add": poly_add, "mul": poly_mul, "compose": poly_compose}[self.op](*values)

    def to_text(self) -> str:
        if self.op is None:
            return format_poly(self.poly)
        operands = [f"({a.to_text()})" for a in self.args]
        if self.op == "neg":
            return "-" + operands[0]
        return operands[0] + OP_SYMBOLS[self.op] + operands[1]


def random_poly(rng: random.Random) -> Poly:
    """A nonzero leaf with 1 to 3 terms, so that prompts stay short."""
    n_terms = rng.randint(1, 3)
    coeffs = [0] * N_COEFFS
    for degree in rng.sample(range(N_COEFFS), n_terms):
        coeffs[degree] = rng.randint(1, MODULUS - 1)
    return tuple(coeffs)


def random_expr(rng: random.Random, n_ops: int) -> Expr:
    """A uniformly shaped random expression with exactly `n_ops` operations."""
    if n_ops == 0:
        return Expr(poly=random_poly(rng))
    op = rng.choice(OPERATIONS)
    if op == "neg":
        return Expr(op=op, args=(random_expr(rng, n_ops - 1),))
    n_left = rng.randint(0, n_ops - 1)
    return Expr(op=op, args=(random_expr(rng, n_left), random_expr(rng, n_ops - 1 - n_left)))


# ---------------------------------------------------------------------------------------------
# Examples and datasets.


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    n_ops: int

    def to_json(self) -> str:
        return json.dumps({"prompt": self.prompt, "answer": self.answer, "n_ops": self.n_ops},
                          ensure_ascii=False)

    def to_document(self) -> str:
        """The example as plain training text: prompt immediately followed by the answer."""
        return self.prompt + self.answer


def make_example(expr: Expr) -> Example:
    return Example(prompt=expr.to_text() + "=", answer=format_poly(expr.evaluate()),
                   n_ops=expr.n_ops)


def generate_examples(n: int, ops_range: Iterable[int], seed: int,
                      exclude: Iterable[str] = ()) -> list[Example]:
    """`n` distinct examples whose operation counts cycle through `ops_range` (so each count is
    equally represented); prompts in `exclude` are skipped. Deterministic given `seed`."""
    ops = list(ops_range)
    rng = random.Random(seed)
    seen = set(exclude)
    examples: list[Example] = []
    attempts = 0
    while len(examples) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct examples with op counts {ops}")
        example = make_example(random_expr(rng, ops[len(examples) % len(ops)]))
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        examples.append(example)
    return examples


def write_dataset(out_dir: str | Path, n_train: int, n_test: int,
                  train_ops: Iterable[int] = range(1, 6), ood_ops: Iterable[int] = range(6, 11),
                  seed: int = 0) -> dict[str, Path]:
    """Write the train split and in-/out-of-domain test splits.

    Files: train.jsonl, test_in_domain.jsonl, test_out_of_domain.jsonl (one {"prompt", "answer",
    "n_ops"} object per line) and train.txt (one `prompt+answer` document per line). Test prompts
    never occur in the train split. Returns the paths by split name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_ops, ood_ops = list(train_ops), list(ood_ops)
    # Tests are drawn first so the train split can exclude them.
    test_in = generate_examples(n_test, train_ops, seed=seed * 3 + 1)
    test_ood = generate_examples(n_test, ood_ops, seed=seed * 3 + 2)
    held_out = {e.prompt for e in test_in + test_ood}
    train = generate_examples(n_train, train_ops, seed=seed * 3, exclude=held_out)

    paths = {name: out_dir / f"{name}.jsonl"
             for name in ("train", "test_in_domain", "test_out_of_domain")}
    for name, examples in zip(paths, (train, test_in, test_ood)):
        paths[name].write_text("".join(e.to_json() + "\n" for e in examples), encoding="utf-8")
    paths["train_documents"] = out_dir / "train.txt"
    paths["train_documents"].write_text("".join(e.to_document() + "\n" for e in train),
                                        encoding="utf-8")
    return paths


def read_examples(path: str | Path) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Scoring.

Generate = Callable[[list[str], int], list[str]]


def extract_answer(completion: str) -> str:
    """The first whitespace-delimited word of a completion ('' if there is none)."""
    words = completion.split()
    return words[0] if words else ""


def score(examples: Sequence[Example], generate: Generate, max_new_tokens: int = 32,
          batch_size: int = 64) -> dict[int, float]:
    """Exact-match accuracy per number of operations.

    `generate(prompts, max_new_tokens)` returns the continuation of each prompt (without the
    prompt). The answer counts as correct if the completion's first word equals it exactly.
    """
    correct: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        completions = generate([e.prompt for e in batch], max_new_tokens)
        if len(completions) != len(batch):
            raise ValueError(f"generate returned {len(completions)} completions for "
                             f"{len(batch)} prompts")
        for example, completion in zip(batch, completions):
            total[example.n_ops] += 1
            correct[example.n_ops] += extract_answer(completion) == example.answer
    return {n: correct[n] / total[n] for n in sorted(total)}
