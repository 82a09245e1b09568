"""`make reproduce`: a CPU-sized reproduction of the paper's small-scale findings.

Gloeckle et al. 2024 report that, at equal parameter count and compute, multi-token prediction
improves polynomial arithmetic over F7[X]/(X^5) (more so out of domain, i.e. with more
operations than seen in training; their section 4.2) and helps induction on two-token names at
small model sizes (their section 4.1). This script trains one tiny model per n in {1, 2, 4} on each
task, through the real trainer (`mtp_pretrain.train.run`) with `model.match_baseline_params=true`
(parameter counts match), the same steps, batch, learning-rate schedule, seed and data order,
then evaluates

* polynomial: exact-match greedy accuracy per number of operations, in domain (1-5 operations,
  as in training) and out of domain (6-10), and per-head validation loss / accuracy;
* induction: accuracy of the second token of two-token names at their later occurrences, and
  per-head validation loss / accuracy,

and writes docs/reproduction.json, the results section of docs/reproduction.md and the plots
docs/reproduction_polynomial.png, docs/reproduction_losses.png.

Budget: by default the number of steps is calibrated (a few timed steps before the runs) so that
the whole script takes about --budget-min minutes on the machine at hand; the same step count is
then used for every n of a task. `--steps N` fixes it instead; `--smoke` is a 2-minute check.
Runs are cached: a run whose final checkpoint exists is not trained again (--fresh retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.tokenize_corpus import tokenize_to_dataset  # noqa: E402
from mtp_pretrain.checkpoint_reader import find_latest  # noqa: E402
from mtp_pretrain.config import compose_job_config  # noqa: E402
from mtp_pretrain.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer  # noqa: E402
from mtp_pretrain.eval import induction, polynomial  # noqa: E402
from mtp_pretrain.eval.adapters import make_batch_logits, make_generate  # noqa: E402
from mtp_pretrain.eval.per_head import evaluate_per_head  # noqa: E402
from mtp_pretrain.checkpoint_reader import load_model  # noqa: E402
from mtp_pretrain.loss import head_sequential_loss  # noqa: E402
from mtp_pretrain.model import MTPTransformer  # noqa: E402
from mtp_pretrain.model.config import ModelConfig, count_parameters  # noqa: E402

RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


class Progress:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.units_total, self.units_done = 0.0, 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        eta = ""
        if self.units_done > 0 and self.units_total > 0:
            rate = self.elapsed() / self.units_done
            eta = f", eta {max(0.0, (self.units_total - self.units_done) * rate) / 60:.1f} min"
        print(f"[reproduce {self.elapsed() / 60:5.1f} min{eta}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def build_polynomial_data(work: Path, n_train: int, n_test_per_op: int, seed: int) -> Path:
    out = work / "data" / "polynomial"
    if (out / "dataset" / "metadata.json").is_file():
        return out
    paths = polynomial.write_dataset(out, n_train=n_train, n_test=5 * n_test_per_op, seed=seed)
    ByteTokenizer().save(out / "tokenizer.json")
    docs = ({"text": line} for line in paths["train_documents"].read_text(encoding="utf-8").splitlines())
    tokenize_to_dataset(docs, out / "tokenizer.json", out / "dataset", workers=1, val_fraction=0.02,
                        source_description=f"polynomial arithmetic over F7[X]/(X^5), 1-5 operations, seed {seed}")
    return out


def build_induction_data(work: Path, n_stories: int, vocab_size: int, seed: int) -> Path:
    out = work / "data" / "induction"
    if (out / "dataset" / "metadata.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    stories = induction.training_stories(n_stories, seed=seed)
    tok = BPETokenizer.train(stories[:5000], vocab_size, show_progress=False)
    tok.save(out / "tokenizer.json")
    tokenize_to_dataset(({"text": s} for s in stories), out / "tokenizer.json", out / "dataset", workers=1,
                        val_fraction=0.02, source_description=f"template children's stories, seed {seed}")
    return out


# ---------------------------------------------------------------------------------------------
# Training


def model_overrides(args, n: int, vocab: int, max_seq_len: int) -> list[str]:
    return [f"model.n_future={n}", f"model.dim={args.dim}", f"model.n_layers={args.layers}",
            f"model.n_heads={args.n_heads}", "model.match_baseline_params=true", f"model.vocab_size={vocab}",
            f"model.max_seq_len={max_seq_len}", "model.head_type=transformer", "model.name=reproduce"]


def model_config(args, n: int, vocab: int, max_seq_len: int) -> ModelConfig:
    return ModelConfig(n_future=n, dim=args.dim, n_layers=args.layers, n_heads=args.n_heads,
                       match_baseline_params=True, vocab_size=vocab, max_seq_len=max_seq_len)


def calibrate_step_s(args, vocab: int, seq_len: int, batch: int, max_seq_len: int, n: int = 4, reps: int = 4) -> float:
    """Seconds per optimizer step of the n=4 model (the slowest of the three), timed directly."""
    torch.manual_seed(0)
    model = MTPTransformer(model_config(args, n, vocab, max_seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (batch, seq_len + n))
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        head_sequential_loss(model, tokens, seq_len=seq_len)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2] * 1.15  # trainer overhead (data, logging, val)


def train_one(args, task: str, n: int, data_dir: Path, vocab: int, seq_len: int, batch: int, steps: int,
              max_seq_len: int, progress: Progress) -> Path:
    run_dir = Path(args.work_dir) / f"{task}_n{n}"
    ckpt = find_latest(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if ckpt is not None and not args.fresh and ckpt.name == f"step-{steps:08d}":
        progress.say(f"{task} n={n}: reusing {ckpt}")
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    from mtp_pretrain.train import run

    overrides = model_overrides(args, n, vocab, max_seq_len) + [
        f"data.sources=[{{path:{data_dir / 'dataset'},weight:1.0}}]", f"data.seq_len={seq_len}", "data.prefetch=1",
        f"train.max_steps={steps}", f"train.micro_batch_size={batch}", f"train.seed={args.seed}",
        "train.resume=never", "train.device=cpu", "train.dtype=float32",
        f"optim.lr={args.lr}", f"optim.warmup_steps={max(1, min(50, steps // 10))}",
        "logging=quiet", f"logging.interval={max(1, steps // 50)}", f"logging.val_interval={max(1, steps // 8)}",
        "logging.val_batches=4", "checkpoint.interval=0", "checkpoint.keep=1"]
    cfg = compose_job_config(overrides)
    progress.say(f"{task} n={n}: training {steps} steps x {batch} x {seq_len} tokens -> {run_dir}")
    code = run(cfg, run_dir)
    if code:
        raise SystemExit(f"training {task} n={n} exited with {code}")
    return run_dir


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---------------------------------------------------------------------------------------------
# Evaluation


def constant_baseline(data_dir: Path, answer: str = "0") -> dict:
    """Accuracy of always answering ``answer`` (the most common answer: products and
    compositions often vanish mod X^5), per split and number of operations."""
    out = {}
    for split in ("test_in_domain", "test_out_of_domain"):
        examples = polynomial.read_examples(data_dir / f"{split}.jsonl")
        ops = sorted({e.n_ops for e in examples})
        acc = {str(k): sum(e.answer == answer for e in examples if e.n_ops == k) /
               sum(e.n_ops == k for e in examples) for k in ops}
        out[split], out[split + "_mean"] = acc, sum(acc.values()) / len(acc)
    return out


def answer_token_accuracy(model, tok, data_dir: Path) -> dict:
    """Teacher-forced head-1 top-1 accuracy on the answer's tokens (and the EOS after it), per
    split: partial progress that exact match does not show."""
    batch_logits = make_batch_logits(model, batch_size=64, prefix_ids=[tok.eos_id])
    out = {}
    for split in ("test_in_domain", "test_out_of_domain"):
        examples = polynomial.read_examples(data_dir / f"{split}.jsonl")
        seqs = [tok.encode(e.prompt + e.answer) + [tok.eos_id] for e in examples]
        hits = total = 0
        for e, seq, logits in zip(examples, seqs, batch_logits(seqs)):
            start = len(tok.encode(e.prompt))
            pred = logits[start - 1: len(seq) - 1].argmax(-1)
            hits += int((pred == torch.tensor(seq[start:])).sum())
            total += len(seq) - start
        out[split] = hits / total
    return out


def eval_polynomial(run_dir: Path, data_dir: Path, seq_len: int) -> dict:
    model, tok = load_model(run_dir / "checkpoints")
    torch.manual_seed(0)
    generate = make_generate(model, tok, prefix_ids=[tok.eos_id])
    out = {}
    for split in ("test_in_domain", "test_out_of_domain"):
        examples = polynomial.read_examples(data_dir / f"{split}.jsonl")
        acc = polynomial.score(examples, generate, max_new_tokens=24, batch_size=64)
        out[split] = {str(k): v for k, v in acc.items()}
        out[split + "_mean"] = sum(acc.values()) / len(acc)
    out["answer_token_accuracy"] = answer_token_accuracy(model, tok, data_dir)
    out["per_head"] = evaluate_per_head(model, [data_dir / "dataset"], seq_len=seq_len, batch_size=16,
                                        max_batches=16, lookahead=4).to_dict()
    return out


def eval_induction(run_dir: Path, data_dir: Path, seq_len: int, n_stories: int) -> dict:
    model, tok = load_model(run_dir / "checkpoints")
    examples = induction.make_examples(tok, n_stories, seed=12345)
    acc = induction.score_batched(examples, make_batch_logits(model, prefix_ids=[tok.eos_id]))
    per_head = evaluate_per_head(model, [data_dir / "dataset"], seq_len=seq_len, batch_size=16,
                                 max_batches=16, lookahead=4).to_dict()
    return {"accuracy": acc, "targets": sum(len(e.targets) for e in examples), "per_head": per_head}


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(res: dict) -> str:
    lines = [f"Generated by `bench/reproduce.py` on {res['date']} in {res['wall_min']:.1f} min "
             f"(torch {res['torch']}, {res['threads']} threads). Settings: {res['settings_text']}.", ""]
    poly = res.get("polynomial")
    if poly:
        ops = sorted({int(k) for r in poly["runs"].values() for s in ("test_in_domain", "test_out_of_domain")
                      for k in r[s]})
        lines += [f"### Polynomial arithmetic ({poly['steps']} steps x {poly['tokens_per_step']} tokens, "
                  f"{poly['params'] / 1e6:.2f}M parameters each)", "",
                  "Exact-match accuracy (%) of greedy answers by number of operations "
                  f"({poly['n_test_per_op']} test problems per count; 1-5 in domain, 6-10 out of domain):", "",
                  "| n | " + " | ".join(str(o) for o in ops) + " | in-domain mean | out-of-domain mean |",
                  "|---" * (len(ops) + 3) + "|"]
        for n, r in poly["runs"].items():
            accs = {**r["test_in_domain"], **r["test_out_of_domain"]}
            lines.append(f"| {n} | " + " | ".join(fmt(accs[str(o)]) for o in ops)
                         + f" | **{fmt(r['test_in_domain_mean'])}** | **{fmt(r['test_out_of_domain_mean'])}** |")
        if poly.get("always_zero"):
            z = poly["always_zero"]
            accs = {**z["test_in_domain"], **z["test_out_of_domain"]}
            lines.append("| always `0` | " + " | ".join(fmt(accs[str(o)]) for o in ops)
                         + f" | {fmt(z['test_in_domain_mean'])} | {fmt(z['test_out_of_domain_mean'])} |")
        if all("answer_token_accuracy" in r for r in poly["runs"].values()):
            lines += ["", "Teacher-forced head-1 accuracy (%) on the answer's tokens and the EOS after it "
                      "(partial progress that exact match hides):", "",
                      "| n | in domain | out of domain |", "|---|---|---|"]
            lines += [f"| {n} | {fmt(r['answer_token_accuracy']['test_in_domain'])} | "
                      f"{fmt(r['answer_token_accuracy']['test_out_of_domain'])} |" for n, r in poly["runs"].items()]
        lines += ["", per_head_table(poly["runs"]), ""]
    ind = res.get("induction")
    if ind:
        lines += [f"### Induction ({ind['steps']} steps x {ind['tokens_per_step']} tokens, "
                  f"{ind['params'] / 1e6:.2f}M parameters each)", "",
                  f"Accuracy (%) on the second token of two-token names at later occurrences "
                  f"({ind['n_stories']} stories, {next(iter(ind['runs'].values()))['targets']} targets; "
                  f"chance is about 1/vocabulary = {fmt(1 / ind['vocab'])}):", "",
                  "| n | induction accuracy |", "|---|---|"]
        for n, r in ind["runs"].items():
            lines.append(f"| {n} | {fmt(r['accuracy'])} |")
        lines += ["", per_head_table(ind["runs"]), ""]
    lines += ["![accuracy vs operations](reproduction_polynomial.png)", "",
              "![loss curves](reproduction_losses.png)"]
    return "\n".join(lines)


def per_head_table(runs: dict) -> str:
    max_n = max(len(r["per_head"]["loss"]) for r in runs.values())
    head = "| n | " + " | ".join(f"head {i} loss / acc." for i in range(1, max_n + 1)) + " |"
    rows = [f"Validation (held-out documents, {next(iter(runs.values()))['per_head']['tokens'][0]:,} "
            "target tokens per head, same windows for every n): cross-entropy (nats/token) / top-1 accuracy (%)",
            "", head, "|---" * (max_n + 1) + "|"]
    for n, r in runs.items():
        ph = r["per_head"]
        cells = [f"{l:.3f} / {fmt(a)}" for l, a in zip(ph["loss"], ph["accuracy"])]
        rows.append(f"| {n} | " + " | ".join(cells + ["" for _ in range(max_n - len(cells))]) + " |")
    return "\n".join(rows)


def plot(res: dict, work: Path, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"1": "tab:blue", "2": "tab:orange", "4": "tab:green"}
    poly = res.get("polynomial")
    if poly:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for n, r in poly["runs"].items():
            accs = {int(k): v for s in ("test_in_domain", "test_out_of_domain") for k, v in r[s].items()}
            xs = sorted(accs)
            ax.plot(xs, [100 * accs[x] for x in xs], "o-", color=colors.get(n), label=f"n={n}")
        if poly.get("always_zero"):
            z = {int(k): v for s in ("test_in_domain", "test_out_of_domain") for k, v in poly["always_zero"][s].items()}
            ax.plot(sorted(z), [100 * z[x] for x in sorted(z)], "x:", color="0.5", label="always answer 0")
        ax.axvspan(5.5, 10.5, color="0.92", zorder=0)
        ax.text(8, ax.get_ylim()[1] * 0.95, "out of domain", ha="center", va="top", color="0.4")
        ax.set_xlabel("number of operations")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(f"Polynomial arithmetic, {poly['params'] / 1e6:.2f}M params, {poly['steps']} steps")
        ax.set_xticks(range(1, 11))
        ax.set_xlim(0.5, 10.5)
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / "reproduction_polynomial.png", dpi=110)
        plt.close(fig)

    tasks = [t for t in ("polynomial", "induction") if res.get(t)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        ax_h1, ax_heads = axes[row]
        for n in res[task]["runs"]:
            m = read_metrics(work / f"{task}_n{n}")
            tr = [r for r in m if "loss/head_1" in r]
            va = [r for r in m if "val/loss/head_1" in r]
            ax_h1.plot([r["step"] for r in tr], [r["loss/head_1"] for r in tr], color=colors.get(n), alpha=0.5,
                       label=f"n={n} train")
            ax_h1.plot([r["step"] for r in va], [r["val/loss/head_1"] for r in va], "o--", color=colors.get(n),
                       label=f"n={n} val")
            if n == max(res[task]["runs"], key=int):
                heads = sorted(int(k.split("_")[-1]) for k in tr[0] if k.startswith("loss/head_")) if tr else []
                for i in heads:
                    ax_heads.plot([r["step"] for r in tr], [r[f"loss/head_{i}"] for r in tr], label=f"head {i} train")
                    ax_heads.plot([r["step"] for r in va], [r[f"val/loss/head_{i}"] for r in va], "o--",
                                  color=ax_heads.lines[-1].get_color(), label=f"head {i} val")
                ax_heads.set_title(f"{task}: every head of the n={n} model")
        ax_h1.set_title(f"{task}: head-1 (next-token) loss")
        for ax in (ax_h1, ax_heads):
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats/token)")
            ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(docs / "reproduction_losses.png", dpi=110)
    plt.close(fig)


def write_report(res: dict, docs: Path) -> None:
    (docs / "reproduction.json").write_text(json.dumps(res, indent=1) + "\n")
    md = docs / "reproduction.md"
    block = f"{RESULTS_START}\n{results_markdown(res)}\n{RESULTS_END}"
    if md.is_file() and RESULTS_START in md.read_text():
        text = re.sub(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), lambda _: block,
                      md.read_text(), flags=re.S)
    else:
        text = ("# Reproduction: multi-token prediction on polynomial arithmetic and induction\n\n"
                "`make reproduce` (bench/reproduce.py). Results:\n\n" + block + "\n")
    md.write_text(text)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "reproduce"))
    ap.add_argument("--docs-dir", default=str(ROOT / "docs"))
    ap.add_argument("--budget-min", type=float, default=40.0, help="target wall time when steps are calibrated")
    ap.add_argument("--steps", type=int, default=None, help="polynomial steps (default: calibrated to the budget)")
    ap.add_argument("--min-steps", type=int, default=150)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--induction-share", type=float, default=0.3,
                    help="share of the training budget spent on the induction runs (0 = skip induction)")
    ap.add_argument("--futures", default="1,2,4")
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--layers", type=int, default=5, help="n_layers of the n=1 baseline's trunk (+1 head block)")
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128, help="polynomial training sequence length")
    ap.add_argument("--induction-seq-len", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--n-test-per-op", type=int, default=60)
    ap.add_argument("--n-stories", type=int, default=20000, help="induction training stories")
    ap.add_argument("--n-eval-stories", type=int, default=100)
    ap.add_argument("--bpe-vocab", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the fastest "
                    "of 1, 2, all cores, timed)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already exist")
    ap.add_argument("--smoke", action="store_true", help="about 2 minutes: tiny data, few steps; no docs written")
    ap.add_argument("--report-only", action="store_true",
                    help="redo the plots and docs/reproduction.md from docs/reproduction.json and the runs")
    args = ap.parse_args(argv)
    if args.report_only:
        docs, work = Path(args.docs_dir), Path(args.work_dir)
        res = json.loads((docs / "reproduction.json").read_text())
        if res.get("polynomial") and "always_zero" not in res["polynomial"]:
            res["polynomial"]["always_zero"] = constant_baseline(work / "data" / "polynomial")
        for n, r in (res.get("polynomial") or {}).get("runs", {}).items():
            if "answer_token_accuracy" not in r:
                model, tok = load_model(work / f"polynomial_n{n}" / "checkpoints")
                r["answer_token_accuracy"] = answer_token_accuracy(model, tok, work / "data" / "polynomial")
        plot(res, work, docs)
        write_report(res, docs)
        print(results_markdown(res))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.work_dir = args.work_dir + "_smoke"
        args.steps, args.n_train, args.n_test_per_op, args.n_stories, args.n_eval_stories = 12, 3000, 4, 1500, 6
        args.dim, args.layers, args.batch = 32, 4, 8
    futures = [int(x) for x in args.futures.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    docs = Path(args.docs_dir) if not args.smoke else work / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    progress.say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, work dir {work}")

    poly_dir = build_polynomial_data(work, args.n_train, args.n_test_per_op, seed=0)
    do_induction = args.induction_share > 0
    ind_dir = build_induction_data(work, args.n_stories, args.bpe_vocab, seed=0) if do_induction else None
    byte_vocab = ByteTokenizer().vocab_size
    ind_vocab = load_tokenizer(ind_dir / "tokenizer.json").vocab_size if do_induction else 0
    progress.say("data ready")

    poly_max_len = 256  # out-of-domain prompts reach ~155 bytes
    ind_max_len = 512
    if args.steps:
        poly_steps = args.steps
    else:
        if args.threads:
            step_s = calibrate_step_s(args, byte_vocab, args.seq_len, args.batch, poly_max_len)
        else:
            # On a shared machine intra-op threads can oversubscribe the cores (10x slower): time
            # 1 and 2 threads (and all cores) and keep the fastest.
            timings = {}
            for threads in sorted({1, 2, os.cpu_count() or 1}):
                torch.set_num_threads(threads)
                timings[threads] = calibrate_step_s(args, byte_vocab, args.seq_len, args.batch, poly_max_len)
            best = min(timings, key=timings.get)
            torch.set_num_threads(best)
            step_s = timings[best]
            progress.say("threads: " + ", ".join(f"{t}: {s:.2f} s/step" for t, s in timings.items())
                         + f" -> {best}")
        # Evaluation (greedy decoding, per-head) and start-up take roughly 10% of the budget.
        train_s = 0.88 * args.budget_min * 60 - progress.elapsed()
        poly_share = 1 - (args.induction_share if do_induction else 0)
        poly_steps = int(poly_share * train_s / (len(futures) * step_s))
        poly_steps = max(args.min_steps, min(args.max_steps, poly_steps // 50 * 50))
        progress.say(f"calibrated: {step_s:.2f} s/step -> {poly_steps} polynomial steps per model")
    ind_steps = 0
    if do_induction:
        # Same tokens per step (batch x seq_len) as the polynomial runs.
        ind_batch = max(1, args.batch * args.seq_len // args.induction_seq_len)
        share = args.induction_share / (1 - args.induction_share)
        ind_steps = args.steps if args.smoke else max(50, int(poly_steps * share) // 50 * 50)
    units = {"polynomial": poly_steps, "induction": ind_steps}
    progress.units_total = sum(units[t] for t in units if units[t]) * len(futures)

    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "settings_text": (f"dim {args.dim}, {args.layers + 1} blocks in total (n=1: {args.layers} trunk + 1 head; "
                             f"n=4: {args.layers - 3} trunk + 4 heads), {args.n_heads} attention heads, AdamW lr "
                             f"{args.lr} cosine, batch {args.batch} x {args.seq_len} tokens (induction: "
                             f"{max(1, args.batch * args.seq_len // args.induction_seq_len)} x {args.induction_seq_len}), "
                             f"seed {args.seed}"),
           "args": vars(args)}
    pcount = count_parameters(model_config(args, 1, byte_vocab, poly_max_len))["total"]
    res["polynomial"] = {"steps": poly_steps, "tokens_per_step": args.batch * args.seq_len, "params": pcount,
                         "n_test_per_op": args.n_test_per_op, "always_zero": constant_baseline(poly_dir), "runs": {}}
    for n in futures:
        run_dir = train_one(args, "polynomial", n, poly_dir, byte_vocab, args.seq_len, args.batch, poly_steps,
                            poly_max_len, progress)
        progress.units_done += poly_steps
        progress.say(f"polynomial n={n}: evaluating")
        r = eval_polynomial(run_dir, poly_dir, args.seq_len)
        r["params"] = count_parameters(model_config(args, n, byte_vocab, poly_max_len))
        res["polynomial"]["runs"][str(n)] = r
        progress.say(f"polynomial n={n}: in-domain {fmt(r['test_in_domain_mean'])}% out-of-domain "
                     f"{fmt(r['test_out_of_domain_mean'])}% val head-1 loss {r['per_head']['loss'][0]:.4f}")
    if do_induction:
        ind_batch = max(1, args.batch * args.seq_len // args.induction_seq_len)
        res["induction"] = {"steps": ind_steps, "tokens_per_step": ind_batch * args.induction_seq_len,
                            "params": count_parameters(model_config(args, 1, ind_vocab, ind_max_len))["total"],
                            "vocab": ind_vocab, "n_stories": args.n_eval_stories, "runs": {}}
        for n in futures:
            run_dir = train_one(args, "induction", n, ind_dir, ind_vocab, args.induction_seq_len, ind_batch,
                                ind_steps, ind_max_len, progress)
            progress.units_done += ind_steps
            progress.say(f"induction n={n}: evaluating")
            r = eval_induction(run_dir, ind_dir, args.induction_seq_len, args.n_eval_stories)
            res["induction"]["runs"][str(n)] = r
            progress.say(f"induction n={n}: accuracy {fmt(r['accuracy'])}% val head-1 loss "
                         f"{r['per_head']['loss'][0]:.4f}")
    res["wall_min"] = progress.elapsed() / 60
    plot(res, work, docs)
    write_report(res, docs)
    progress.say(f"done: {docs / 'reproduction.md'}")
    print(results_markdown(res))


if __name__ == "__main__":
    main()
