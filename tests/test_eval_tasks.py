"""Tests of the model-independent evaluation tasks: polynomial arithmetic, induction, HumanEval
pass@k and the execution sandbox."""

import json
import math
import os
import random
import re
import time

import pytest
import sympy
import torch
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                        parse_expr, standard_transformations)

from mtp_pretrain.eval import humaneval, induction, polynomial
from mtp_pretrain.eval.sandbox import SandboxLimits, run_program

# ---------------------------------------------------------------------------------------------
# Polynomial arithmetic, checked against sympy on the prompt text itself.

X = sympy.Symbol("x")
X5 = sympy.Poly(X**5, X, modulus=7)


def sympy_poly(text: str) -> sympy.Poly:
    transformations = standard_transformations + (implicit_multiplication_application,
                                                  convert_xor)
    return sympy.Poly(parse_expr(text, transformations=transformations), X, modulus=7)


def sympy_evaluate(text: str) -> sympy.Poly:
    """Independent evaluator of a prompt (without '='): a recursive-descent parser of the
    grammar expr := '-' operand | operand op operand | polynomial, operand := '(' expr ')',
    with sympy doing the arithmetic and `rem X^5` the truncation."""

    def operand(i):
        assert text[i] == "("
        value, i = expr(i + 1)
        assert text[i] == ")"
        return value, i + 1

    def expr(i):
        if text[i] == "-":
            value, i = operand(i + 1)
            return -value, i
        if text[i] == "(":
            left, i = operand(i)
            op = text[i]
            right, i = operand(i + 1)
            if op == "+":
                return left + right, i
            if op == "*":
                return (left * right).rem(X5), i
            assert op == "∘", op
            return left.compose(right).rem(X5), i
        end = i
        while end < len(text) and text[end] not in "()":
            end += 1
        return sympy_poly(text[i:end]), end

    value, end = expr(0)
    assert end == len(text)
    return value


def canonical_text(p: sympy.Poly) -> str:
    terms = []
    for degree in range(4, -1, -1):
        c = int(p.coeff_monomial(X**degree)) % 7
        if c:
            monomial = {0: "", 1: "x"}.get(degree, f"x^{degree}")
            terms.append(str(c) + monomial if c != 1 or degree == 0 else monomial)
    return "+".join(terms) or "0"


def test_polynomial_answers_match_sympy():
    examples = polynomial.generate_examples(264, range(0, 11), seed=123)
    assert {e.n_ops for e in examples} == set(range(11))
    for e in examples:
        assert e.prompt.endswith("=")
        expected = sympy_evaluate(e.prompt[:-1])
        assert sympy_poly(e.answer) == expected, e
        assert e.answer == canonical_text(expected), e


def test_polynomial_operations_are_counted_and_present():
    examples = polynomial.generate_examples(400, range(1, 11), seed=1)
    for e in examples:
        n_symbols = sum(e.prompt.count(s) for s in "+*∘") + e.prompt.count("-(")
        # '+' also appears inside leaf polynomials, so the symbols bound the count from above.
        assert n_symbols >= e.n_ops
    text = "".join(e.prompt for e in examples)
    assert all(s in text for s in ("+", "*", "∘", "-("))


def test_composition_examples():
    assert polynomial.poly_compose((0, 1, 0, 0, 0), (3, 2, 0, 0, 1)) == (3, 2, 0, 0, 1)  # x∘q = q
    # (x^2)∘(x+1) = x^2+2x+1; (x^3)∘(x^2) = x^6 -> truncated to 0.
    assert polynomial.poly_compose((0, 0, 1, 0, 0), (1, 1, 0, 0, 0)) == (1, 2, 1, 0, 0)
    assert polynomial.poly_compose((0, 0, 0, 1, 0), (0, 0, 1, 0, 0)) == (0, 0, 0, 0, 0)
    assert polynomial.format_poly((0, 0, 0, 0, 0)) == "0"
    assert polynomial.format_poly((1, 1, 0, 6, 1)) == "x^4+6x^3+x+1"


def test_polynomial_generation_is_deterministic():
    a = polynomial.generate_examples(50, range(1, 6), seed=7)
    assert a == polynomial.generate_examples(50, range(1, 6), seed=7)
    assert a != polynomial.generate_examples(50, range(1, 6), seed=8)
    assert len({e.prompt for e in a}) == 50


def test_polynomial_dataset_files(tmp_path):
    paths = polynomial.write_dataset(tmp_path, n_train=200, n_test=50, seed=3)
    train = polynomial.read_examples(paths["train"])
    test_in = polynomial.read_examples(paths["test_in_domain"])
    test_ood = polynomial.read_examples(paths["test_out_of_domain"])
    assert (len(train), len(test_in), len(test_ood)) == (200, 50, 50)
    assert {e.n_ops for e in train} == {e.n_ops for e in test_in} == set(range(1, 6))
    assert {e.n_ops for e in test_ood} == set(range(6, 11))
    assert not {e.prompt for e in train} & {e.prompt for e in test_in + test_ood}
    first = json.loads(paths["train"].read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"prompt", "answer", "n_ops"}
    documents = paths["train_documents"].read_text(encoding="utf-8").splitlines()
    assert documents == [e.prompt + e.answer for e in train]


def test_polynomial_scorer():
    examples = polynomial.generate_examples(60, range(1, 4), seed=0)
    answers = {e.prompt: e.answer for e in examples}
    n_ops = {e.prompt: e.n_ops for e in examples}
    calls = []

    def oracle(prompts, max_new_tokens):
        calls.append(len(prompts))
        # Leading space and trailing text after the answer are ignored by exact match.
        return [" " + answers[p] + "\n(x)*(x)=x^2" for p in prompts]

    assert polynomial.score(examples, oracle, batch_size=16) == {1: 1.0, 2: 1.0, 3: 1.0}
    assert calls == [16, 16, 16, 12]

    def right_for_one_op(prompts, max_new_tokens):
        return [answers[p] if n_ops[p] == 1 else answers[p] + "1" for p in prompts]

    assert polynomial.score(examples, right_for_one_op) == {1: 1.0, 2: 0.0, 3: 0.0}


# ---------------------------------------------------------------------------------------------
# Induction.


class SyllableByteTokenizer:
    """Byte-level tokenizer with extra syllable tokens, encoded by greedy longest match: all 256
    bytes, every consonant-vowel pair, and every capitalised pair with a leading space."""

    def __init__(self):
        pieces = [bytes([b]) for b in range(256)]
        for c in "bdfgklmnprstvz":
            for v in "aeiou":
                pieces += [(c + v).encode(), (" " + c.upper() + v).encode()]
        self.vocab = pieces
        self.index = {p: i for i, p in enumerate(pieces)}
        self.max_len = max(map(len, pieces))

    def encode(self, text):
        data, ids, i = text.encode(), [], 0
        while i < len(data):
            for length in range(self.max_len, 0, -1):
                if data[i:i + length] in self.index:
                    ids.append(self.index[data[i:i + length]])
                    i += length
                    break
        return ids

    def decode(self, ids):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


class TrainedBPE:
    """A byte-level BPE from `tokenizers`, trained on a few hundred generated stories."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.tokenizer = Tokenizer(models.BPE())
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self.tokenizer.train_from_iterator(induction.training_stories(300, seed=5), trainer)
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text):
        return self.tokenizer.encode(text).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="module", params=["syllable_bytes", "bpe"])
def tokenizer(request):
    return SyllableByteTokenizer() if request.param == "syllable_bytes" else TrainedBPE()


@pytest.fixture(scope="module")
def induction_examples(tokenizer):
    return induction.make_examples(tokenizer, n_stories=20, seed=0)


def test_names_span_two_tokens_in_context(tokenizer, induction_examples):
    n_targets = 0
    for example in induction_examples:
        assert tokenizer.decode(example.token_ids) == example.text
        assert len(set(example.names)) == len(example.names) >= 2
        first_tokens = set()
        expected_targets = 0
        for name in example.names:
            assert len(tokenizer.encode(" " + name)) == 2, name
            first_tokens.add(tokenizer.encode(" " + name)[0])
            occurrences = len(re.findall(rf"(?<= ){name}(?![a-z])", example.text))
            assert occurrences >= 1
            expected_targets += occurrences - 1
        assert len(first_tokens) == len(example.names)
        assert len(example.targets) == expected_targets
        for p in example.targets:
            # The scored pair is a whole name: its first token precedes the target.
            assert tokenizer.decode(example.token_ids[p - 1:p + 1]) in {" " + n for n in
                                                                        example.names}
        n_targets += len(example.targets)
    assert n_targets >= 5 * len(induction_examples)


def test_syllable_tokenizer_rejects_long_names():
    tok = SyllableByteTokenizer()
    assert len(tok.encode(" Kamilo")) == 3 and len(tok.encode(" Kami")) == 2
    names = induction.pick_names(tok, 50, random.Random(0))
    assert all(len(tok.encode(" " + n)) == 2 for n in names)


def test_induction_generation_is_deterministic():
    tok = SyllableByteTokenizer()
    assert (induction.make_examples(tok, 3, seed=4) == induction.make_examples(tok, 3, seed=4))


def test_induction_scorer(tokenizer, induction_examples):
    vocab_size = max(max(e.token_ids) for e in induction_examples) + 1

    def oracle(ids):
        logits = torch.zeros(len(ids), vocab_size)
        logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])] = 1.0
        return logits

    def uniform(ids):
        return torch.zeros(len(ids), vocab_size)

    def copy_previous_successor(ids):
        """A pure induction head: predict what followed the last earlier occurrence of the
        current token. It solves the task; it cannot guess a name's first occurrence."""
        logits = torch.zeros(len(ids), vocab_size)
        successor = {}
        for t, token in enumerate(ids):
            if token in successor:
                logits[t, successor[token]] = 1.0
            if t + 1 < len(ids):
                successor[token] = ids[t + 1]
        return logits

    generator = torch.Generator().manual_seed(0)

    def random_logits(seqs):
        return [torch.randn(len(s), vocab_size, generator=generator) for s in seqs]

    assert induction.score(induction_examples, oracle) == 1.0
    assert induction.score(induction_examples, uniform) == pytest.approx(1 / vocab_size)
    assert induction.score(induction_examples, copy_previous_successor) == 1.0
    assert induction.score_batched(induction_examples, random_logits, batch_size=7) < 0.05


# ---------------------------------------------------------------------------------------------
# pass@k.


def test_pass_at_k_known_values():
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(5, 0, 1) == 0.0 and humaneval.pass_at_k(5, 0, 5) == 0.0
    assert humaneval.pass_at_k(5, 5, 1) == 1.0 and humaneval.pass_at_k(7, 7, 7) == 1.0
    assert humaneval.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    with pytest.raises(ValueError):
        humaneval.pass_at_k(5, 6, 1)


def test_pass_at_k_matches_binomial_formula():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    # Large n, where the binomials themselves would overflow a float.
    assert humaneval.pass_at_k(2000, 10, 100) == pytest.approx(
        1 - math.comb(1990, 100) / math.comb(2000, 100), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Sandbox.

FAST = SandboxLimits(timeout_s=5.0, cpu_time_s=5)


def test_sandbox_passes_and_fails():
    ok = run_program("print(sum(range(10)))", FAST)
    assert (ok.status, ok.stdout.strip()) == ("passed", "45")
    failed = run_program("assert 1 + 1 == 3, 'math is broken'", FAST)
    assert failed.status == "failed" and "math is broken" in failed.reason
    error = run_program("def f(:\n  pass", FAST)
    assert error.status == "error" and "SyntaxError" in error.reason
    early_exit = run_program("import sys\nsys.exit(0)", FAST)
    assert early_exit.status == "error" and "SystemExit" in early_exit.reason


def test_sandbox_kills_infinite_loop():
    start = time.monotonic()
    result = run_program("while True:\n    pass", SandboxLimits(timeout_s=1.0, cpu_time_s=10))
    assert result.status == "timeout" and "wall-clock" in result.reason
    assert time.monotonic() - start < 5


def test_sandbox_cpu_limit():
    result = run_program("while True:\n    pass", SandboxLimits(timeout_s=20.0, cpu_time_s=1))
    assert result.status == "timeout" and "CPU" in result.reason
    assert result.duration_s < 10


def test_sandbox_memory_limit():
    bomb = "hoard = []\nwhile True:\n    hoard.append(bytearray(16 << 20))"
    result = run_program(bomb, SandboxLimits(timeout_s=10.0, memory_bytes=256 << 20))
    assert result.status == "error" and "MemoryError" in result.reason
    huge = run_program("x = bytearray(64 << 30)", FAST)
    assert huge.status == "error" and "MemoryError" in huge.reason


def test_sandbox_refuses_writes_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim"
    victim.mkdir()
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                f"import os\nos.chdir('/')\nopen({str(target)[1:]!r}, 'a')",
                f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                f"import shutil\nshutil.rmtree({str(victim)!r})",
                f"import os\nos.rename({str(victim)!r}, 'moved_in')",
                "import os\nos.symlink('/etc', 'etc')\nopen('etc/sandbox_test', 'w')"]
    for source in attempts:
        result = run_program(source, FAST)
        assert result.status == "error" and "outside the working directory" in result.reason, \
            (source, result)
    assert not target.exists() and victim.is_dir()
    assert not os.path.exists("/etc/sandbox_test")
    inside = run_program("import os, shutil\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('hi')\n"
                         "shutil.rmtree('a')\nassert not os.path.exists('a')", FAST)
    assert inside.status == "passed", inside


def test_sandbox_file_size_limit():
    result = run_program("open('big', 'wb').write(b'x' * (8 << 20))",
                         SandboxLimits(timeout_s=5.0, file_size_bytes=1 << 20))
    assert result.status == "error" and "File too large" in result.reason


def test_sandbox_stops_forks_spawns_and_sockets():
    for source in ["import os\nwhile True:\n    os.fork()",
                   "import subprocess\nsubprocess.run(['sleep', '30'])",
                   "import os\nos.system('sleep 30')",
                   "import socket\nsocket.create_connection(('127.0.0.1', 80))",
                   "import socket\nsocket.socket()"]:
        result = run_program(source, FAST)
        assert result.status == "error" and "disabled" in result.reason, (source, result)


def _dies_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True  # gone
        if state in ("Z", "X"):  # dead; a zombie waits for a reaper that may be absent
            return True
        time.sleep(0.05)
    return False


def test_sandbox_kills_processes_that_escaped_the_prelude():
    # ctypes reaches libc's fork behind the prelude's back; the process group kill still ends
    # the child. The parent spins until the wall-clock limit either way.
    source = ("import ctypes, sys, time\n"
              "pid = ctypes.CDLL(None).fork()\n"
              "if pid == 0:\n    time.sleep(60)\n"
              "print(pid, flush=True)\n"
              "while True:\n    pass\n")
    result = run_program(source, SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout", result
    pid = int(result.stdout.split()[0])
    if os.geteuid() != 0:  # RLIMIT_NPROC binds non-root users: the kernel refuses the fork itself
        assert pid == -1, f"fork succeeded as uid {os.geteuid()} despite RLIMIT_NPROC: {result}"
    else:  # root ignores RLIMIT_NPROC: the child exists, and the process-group kill must end it
        assert pid > 0, result
        assert _dies_within(pid, 5), f"escaped child {pid} still running"


# ---------------------------------------------------------------------------------------------
# HumanEval.


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in humaneval.load_problems()}


def test_load_problems(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and "def check(candidate)" in first.test


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    chosen = [problems[f"HumanEval/{i}"] for i in (0, 2, 12, 35, 53, 101)]
    canonical = humaneval.check_completions([(p, p.canonical_solution) for p in chosen])
    assert [r.status for r in canonical] == ["passed"] * len(chosen), canonical
    wrong = humaneval.check_completions([(p, "    return None\n") for p in chosen])
    assert all(r.status in ("failed", "error") for r in wrong), wrong
    assert wrong[0].status == "failed"  # has_close_elements: `None == True` fails an assert
    looping = humaneval.check_completion(chosen[0], "    while True:\n        pass\n",
                                         SandboxLimits(timeout_s=1.0))
    assert looping.status == "timeout"


def test_truncate_completion():
    body = "    return x + 1\n"
    assert humaneval.truncate_completion(body + "\ndef other():\n    pass\n") == body
    assert humaneval.truncate_completion(body + "\nprint(f(1))") == body
    assert humaneval.truncate_completion(body) == body


def test_evaluate_pass_at_k(problems):
    chosen = [problems["HumanEval/0"], problems["HumanEval/53"]]
    served: dict[str, int] = {}

    def generate(prompts, max_new_tokens):
        # Alternate right and wrong samples per problem; every sample trails top-level code
        # that truncation must drop (it would end the program with SystemExit).
        outputs = []
        for prompt in prompts:
            problem = next(p for p in chosen if p.prompt == prompt)
            i = served[prompt] = served.get(prompt, -1) + 1
            right = i % 2 == 0
            outputs.append((problem.canonical_solution if right else "    return None\n")
                           + "\ndef unrelated():\n    raise SystemExit(1)\n")
        return outputs

    report = humaneval.evaluate_pass_at_k(chosen, generate, n_samples=4, ks=(1, 2, 10),
                                          batch_size=3)
    assert report.n_correct == {"HumanEval/0": 2, "HumanEval/53": 2}
    assert report.pass_at_k == {1: pytest.approx(0.5), 2: pytest.approx(1 - 1 / 6)}
    assert [r.status for r in report.results["HumanEval/0"]][::2] == ["passed", "passed"]
