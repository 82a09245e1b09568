"""Per-rank peak memory of the multi-token loss under megatron tensor parallelism, TP=1 vs TP=2.

A large-vocabulary model with a tiny trunk (so that the logits dominate): the unembedding is
vocab-sharded (megatron ``ColumnParallelLinear`` over the vocabulary) and each head's loss is
``vocab_parallel_cross_entropy`` of [tokens, V/tp] logits, so the logit memory of a rank should
fall to 1/TP. Each TP degree runs in its own ``torchrun`` (``parallel.strategy=megatron``
conversion of the plain model, head-sequential loss, ``loss.chunk_size=0`` so the logits are
materialised whole); every rank measures the memory of one forward+backward step:

    CPU   reset the kernel's RSS high-water mark (/proc/self/clear_refs "5") after a warm-up step
          and dropping the gradients, run the step, peak = VmHWM - RSS before the step.
    CUDA  max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.

    python -m bench.tp_logit_memory                     # vocab 65536, 2 x 512 tokens, n=4
    python -m bench.tp_logit_memory --vocab 8192 --seq 128   # quick

Prints one JSON line: per-rank step peaks (MiB) at TP=1 and TP=2, their ratio, and the size of
one head's fp32 logits per rank (tokens x V / tp x 4 bytes) for comparison.
"""

from __future__ import annotations

import argparse

from bench.common import MiB, add_result_file_arg, launch, print_result, proc_status_bytes, reset_peak_rss, write_result


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from mtp_pretrain.config import ParallelConfig
    from mtp_pretrain.loss import head_sequential_loss
    from mtp_pretrain.model import MTPTransformer
    from mtp_pretrain.model.config import ModelConfig
    from mtp_pretrain.parallel import build_strategy, init_distributed

    torch.set_num_threads(1)
    env = init_distributed("auto")
    tp = env.world_size
    strategy = build_strategy(ParallelConfig(strategy="megatron", tp_size=tp), env)
    mcfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=1, n_heads=4,
                       n_future=args.n_future, max_seq_len=args.seq + args.n_future)
    strategy.validate(mcfg)
    torch.manual_seed(0)
    model = strategy.parallelize(MTPTransformer(mcfg))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + args.n_future), generator=g).to(env.device)
    cuda = env.device.type == "cuda"

    def step():
        head_sequential_loss(model, tokens, seq_len=args.seq, chunk_size=0)

    step()  # warm-up: allocator and communication buffers
    for p in model.parameters():
        p.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = proc_status_bytes("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
        step()
        peak = proc_status_bytes("VmHWM") - before
    peaks = [None] * tp
    if tp > 1:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    write_result(args.result_file, {"tp": tp, "peaks": peaks, "device": env.device.type}, rank=env.rank)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--n-future", type=int, default=4)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    shape = ["--vocab", str(args.vocab), "--dim", str(args.dim), "--seq", str(args.seq), "--batch", str(args.batch),
             "--n-future", str(args.n_future)]
    results = {tp: launch(__spec__.name, ["--worker", *shape], nproc=tp, what=f"TP={tp}") for tp in args.tp}
    tokens = args.batch * args.seq
    line = {"bench": "tp_logit_memory", "device": results[args.tp[0]]["device"], "vocab": args.vocab,
            "tokens": tokens, "n_future": args.n_future, "dim": args.dim,
            "step_peak_mib_per_rank": {f"tp{tp}": [round(x / MiB, 1) for x in r["peaks"]] for tp, r in results.items()},
            "one_head_logits_mib_per_rank": {f"tp{tp}": round(tokens * args.vocab / tp * 4 / MiB, 1) for tp in results}}
    if 1 in results and 2 in results:
        line["ratio_tp2_over_tp1"] = round(max(results[2]["peaks"]) / max(results[1]["peaks"]), 3)
    print_result(line)


if __name__ == "__main__":
    main()
