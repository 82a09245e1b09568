"""This framework's head-sequential MTP training step vs megatron-core's GPTModel with MTP, on one
CUDA GPU: peak memory and step time of each, and their ratios, as one JSON line.

Same decoder shape on both sides (default: the 1B shape of mtp_pretrain/conf/model/1b.yaml -- dim 2048, 16
blocks to the first prediction, 32 heads / 8 KV heads, SwiGLU 8192, vocab 128256, RMSNorm, RoPE,
no biases -- at seq 4096, batch 1, n = 4 predicted tokens):

(a) ``MTPTransformer`` with ``head_type=causal`` (DeepSeek-V3-style chained heads, what megatron's
    MTP implements): a trunk of L-1 blocks, head 1 of one block (= megatron's L decoder layers),
    heads 2..4 of one block each (= megatron's ``mtp_num_layers=3``), shared unembedding, trained
    with ``head_sequential_loss`` (one head's logits alive at a time; ``--chunk-size`` optional).
(b) ``megatron.core.models.gpt.GPTModel`` with ``mtp_num_layers=3`` (``mtp_loss_scaling_factor=3``
    so every MTP loss has weight 1, as in (a)); Transformer Engine layer specs when TE is
    importable, else megatron's local specs (whose unfused attention materialises s x s scores:
    the JSON says which was used).

Both: float32 weights, ``torch.autocast(bfloat16)``, ``torch.optim.AdamW``, TP=1, one process per
side (a fresh CUDA context, so peaks do not mix; megatron's in a process group of one, launched
with ``torch.distributed.run``). A step is forward + backward + optimizer step;
``--warmup`` steps are run first, then ``--steps`` timed steps (median reported); the peak is
``torch.cuda.max_memory_allocated`` over the timed steps.

    python -m bench.vs_megatron                          # 1B, vocab 128k, seq 4096, n=4
    python -m bench.vs_megatron --dim 512 --layers 4 --heads 8 --kv-heads 4 --ffn 1536 --vocab 32000 --seq 1024

Without CUDA it prints that it needs a GPU and exits 0 without figures. Works with torch >= 2.4
(written against megatron-core 0.16.1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import LaunchError, add_result_file_arg, launch, print_result, write_result


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers up to the first prediction")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n-future", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=0, help="(a): loss.chunk_size")
    ap.add_argument("--megatron-spec", choices=["auto", "te", "local"], default="auto")
    ap.add_argument("--side", choices=["ours", "megatron"], help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    return ap.parse_args(argv)


def _timed_steps(step, args) -> dict:
    import torch

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_s_all": [round(t, 4) for t in times]}


def _batch(args, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randint(0, args.vocab, (args.batch, args.seq + args.n_future), generator=g).to(device)


def run_ours(args) -> dict:
    import torch

    from mtp_pretrain.loss import head_sequential_loss
    from mtp_pretrain.model import MTPTransformer
    from mtp_pretrain.model.config import ModelConfig

    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers - 1, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, ffn_dim=args.ffn, n_future=args.n_future, head_type="causal",
                      head_layers=1, max_seq_len=args.seq + args.n_future, rope_theta=500000.0)
    model = MTPTransformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = _batch(args, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            head_sequential_loss(model, tokens, seq_len=args.seq, chunk_size=args.chunk_size)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _timed_steps(step, args)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def run_megatron(args) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec, get_gpt_mtp_block_spec)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.cuda.set_device(0)
    dist.init_process_group("nccl")  # a world of one, from torch.distributed.run's environment
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)

    use_te = args.megatron_spec == "te"
    if args.megatron_spec == "auto":
        try:
            import transformer_engine  # noqa: F401

            use_te = True
        except Exception:  # noqa: BLE001
            use_te = False
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.dim, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, kv_channels=args.dim // args.heads,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, bf16=False, mtp_num_layers=args.n_future - 1,
        mtp_loss_scaling_factor=float(args.n_future - 1), tensor_model_parallel_size=1,
        sequence_parallel=False, use_cpu_initialization=False)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope", rotary_base=500000,
                     share_embeddings_and_output_weights=False, parallel_output=True,
                     mtp_block_spec=mtp_spec).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = _batch(args, "cuda")
    inputs, labels = tokens[:, :args.seq].contiguous(), tokens[:, 1:args.seq + 1].contiguous()
    position_ids = torch.arange(args.seq, device="cuda").unsqueeze(0).expand(args.batch, -1)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            per_token = model(inputs, position_ids, None, labels=labels, loss_mask=loss_mask)
            loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
        loss.backward()  # the MTP losses ride on this backward (MTPLossAutoScaler)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _timed_steps(step, args)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["spec"] = "transformer_engine" if use_te else "local"
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return out


def main(argv=None) -> int:
    args = _args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/vs_megatron.py needs a CUDA GPU (none visible here); no figures.")
        return 0
    if args.side:
        write_result(args.result_file, run_ours(args) if args.side == "ours" else run_megatron(args))
        return 0
    results = {}
    for side in ("ours", "megatron"):
        try:  # one side failing (megatron's specs, an OOM) still reports the other
            results[side] = launch(__spec__.name, [*(argv if argv is not None else sys.argv[1:]), "--side", side],
                                   nproc=1 if side == "megatron" else None, threads=None, what=f"vs_megatron {side}")
        except LaunchError as e:
            print(e, file=sys.stderr)
            results[side] = {"error": str(e).splitlines()[-1:]}
    line = {"bench": "vs_megatron", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "shape": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                      "ffn": args.ffn, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
                      "n_future": args.n_future, "dtype": "bf16 autocast, fp32 weights + AdamW"},
            "ours": results["ours"], "megatron": results["megatron"]}
    a, b = results["ours"], results["megatron"]
    if "error" not in a and "error" not in b:
        line["peak_ratio_ours_over_megatron"] = round(a["peak_gib"] / b["peak_gib"], 3)
        line["time_ratio_ours_over_megatron"] = round(a["step_s"] / b["step_s"], 3)
    print_result(line, args.result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
