"""Incremental decoding of an MTPTransformer: greedy, sampling, self-speculative and tree modes.

Every mode runs on one :class:`~mtp_pretrain.inference.kv_cache.KVCache` and the same step
structure. Per sequence the decoder keeps

* ``length``: committed positions of the trunk and of heads that read the trunk (their cache
  slots ``< length`` hold the keys of exactly the accepted tokens);
* ``next_token``: the token after them, already decided (it is head 1's choice at the last
  committed position, so it is *certain*) but not yet fed;
* drafts for the tokens after ``next_token``, proposed by heads 2..n at the last committed
  position (self-speculative: one chain; tree: top-k candidates per head).

A step feeds ``[next_token, drafts...]`` at positions ``length, length+1, ...`` in one forward
pass; head 1's outputs verify the drafts; the accepted prefix plus head 1's token after it are
emitted (1 to n tokens per pass) and ``length`` advances over what was accepted. Rejected
positions are rolled back by not counting them (see kv_cache.py). Greedy decoding is the same
step with no drafts, which is why speculative and greedy outputs can be compared token for token.

Batches: prompts of different lengths are right-padded in the prompt pass (padding writes only
beyond each sequence's length, so it is never attended); afterwards each sequence advances by its
own accepted count. Finished sequences (EOS or max tokens) are dropped from the batch.

Causal (chained) heads: head i at position t reads head i-1's state at t and the embedding of
token t+i-1, so its cache slot at t is only final once tokens up to t+i-1 are known. Such heads
keep their own committed length (``head_length[i]`` = positions whose tokens are all known) and
their drafting pass recomputes the positions after it each step, sequentially through the heads
(head i needs head i-1's draft). Tree mode needs independent heads and raises for causal ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch

from mtp_pretrain.inference.adaptive import CostModel, DraftLengthController
from mtp_pretrain.inference.kv_cache import KVCache
from mtp_pretrain.inference.sampling import filtered_probs, leading_true, sample, speculative_accept
from mtp_pretrain.inference.stacked_heads import StackedHeads
from mtp_pretrain.inference.stats import RunStats, SequenceStats
from mtp_pretrain.model.transformer import MTPTransformer

MODES = ("greedy", "sample", "self_speculative", "tree")


@dataclass
class GenerationConfig:
    """``greedy`` and ``sample`` are plain one-token-per-pass decoding (``sample`` needs
    temperature > 0); ``self_speculative`` with temperature 0 is greedy-exact blockwise parallel
    decoding and with temperature > 0 exact speculative sampling; ``tree`` is greedy only."""

    mode: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    eos_id: Optional[int] = None
    tree_widths: tuple[int, ...] = (3, 2, 1)  # candidates per tree depth (head 2, 3, ...)
    # Drafts per pass. "auto": self_speculative chooses k = 0..n-1 before every pass from the
    # measured pass cost and acceptance (see adaptive.py); tree mode uses the whole tree. An int
    # K: always heads 2..K+1; None: always all n-1. A late head whose drafts are rarely accepted
    # costs a head pass, an unembedding row and a fed token every step.
    num_drafts: Union[int, str, None] = "auto"
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.mode == "sample" and self.temperature == 0:
            raise ValueError("mode 'sample' needs temperature > 0 (temperature 0 is mode 'greedy')")
        if self.mode == "greedy" and self.temperature > 0:
            raise ValueError("mode 'greedy' takes no temperature; use mode 'sample'")
        if self.mode == "tree" and self.temperature > 0:
            raise ValueError("tree mode verifies greedily only (multi-candidate rejection sampling is not "
                             "implemented); use self_speculative for exact speculative sampling")
        if isinstance(self.num_drafts, str):
            if self.num_drafts != "auto":
                raise ValueError(f"num_drafts must be 'auto', an int >= 1 or None (all heads), got {self.num_drafts!r}")
        elif self.num_drafts is not None and (isinstance(self.num_drafts, bool) or self.num_drafts < 1):
            raise ValueError(f"num_drafts must be >= 1 (or None for all heads, 'auto'), got {self.num_drafts}")
        if any(w < 1 for w in self.tree_widths) or not self.tree_widths:
            raise ValueError(f"tree_widths must be positive, got {self.tree_widths}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def adaptive(self) -> bool:
        """The number of drafts is chosen per pass (self_speculative with num_drafts='auto')."""
        return self.mode == "self_speculative" and self.num_drafts == "auto"


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (EOS included when it stopped the sequence)
    stats: RunStats


class DraftTree:
    """A static draft tree: the root is the certain next token; every node at depth d-1 has
    ``widths[d-1]`` children, head d+1's top-``widths[d-1]`` tokens. Nodes are numbered
    breadth-first, so a parent always precedes its children."""

    def __init__(self, widths: Sequence[int]):
        parent, depth, rank = [-1], [0], [0]
        frontier = [0]
        for d, w in enumerate(widths, start=1):
            nxt = []
            for p in frontier:
                for r in range(w):
                    parent.append(p), depth.append(d), rank.append(r)
                    nxt.append(len(parent) - 1)
            frontier = nxt
        self.size, self.max_depth, self.max_width = len(parent), len(widths), max(widths)
        self.parent = torch.tensor(parent)
        self.depth = torch.tensor(depth)
        self.rank = torch.tensor(rank)
        # ancestors[node, d]: the node's ancestor at depth d (itself for d >= its depth)
        anc = torch.zeros(self.size, self.max_depth + 1, dtype=torch.long)
        for node in range(self.size):
            chain, cur = [], node
            while cur >= 0:
                chain.append(cur)
                cur = parent[cur]
            chain.reverse()
            anc[node] = torch.tensor(chain + [node] * (self.max_depth + 1 - len(chain)))
        self.ancestors = anc
        # Attention among the tree's tokens: each node sees its ancestors and itself.
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        for node in range(self.size):
            mask[node, anc[node, : depth[node] + 1]] = True
        self.mask = mask
        self.levels = [torch.nonzero(self.depth == d).flatten() for d in range(1, self.max_depth + 1)]

    def to(self, device) -> "DraftTree":
        for name in ("parent", "depth", "rank", "ancestors", "mask"):
            setattr(self, name, getattr(self, name).to(device))
        self.levels = [lv.to(device) for lv in self.levels]
        return self


@dataclass
class _BatchState:
    """Decoder state of the still-active sequences; every tensor has the batch first."""

    rows: torch.Tensor  # [B] index of each sequence in the caller's prompt list (host tensor)
    length: torch.Tensor  # [B] committed positions (trunk and trunk-reading heads)
    next_token: torch.Tensor  # [B] decided, not yet fed
    tokens: torch.Tensor  # [B, capacity] prompt + accepted tokens, then provisional ones
    drafts: Optional[torch.Tensor] = None  # [B, K] chain drafts
    draft_probs: Optional[torch.Tensor] = None  # [B, K, V] what the drafts were sampled from
    candidates: Optional[torch.Tensor] = None  # [B, D, W] tree: top-W tokens of heads 2..D+1
    head_length: Optional[torch.Tensor] = None  # [B, n+1] chain drafting: committed positions of head i
    head_states: Optional[torch.Tensor] = None  # [B, n-1, capacity, dim] causal: states of heads 1..n-1
    trunk_states: Optional[torch.Tensor] = None  # [B, capacity, dim] independent heads: trunk output z

    def select(self, keep: torch.Tensor) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.index_select(0, keep.to(value.device)))


class Decoder:
    """Generates from a (single-process) MTPTransformer. Not thread-safe; one call at a time."""

    def __init__(self, model: MTPTransformer, cost_model: Optional[CostModel] = None):
        """``cost_model(k, batch_size)``: the cost of a pass feeding k drafts, used by
        ``num_drafts="auto"`` instead of the measured one (a test hook; see adaptive.py)."""
        self.model = model.eval()
        self.cost_model = cost_model
        self._pass_times: dict[int, dict] = {}  # max drafts -> measured pass costs, kept across calls
        self._acceptance: dict[int, list] = {}  # max drafts -> the last batches' acceptance counts
        self.cfg = model.cfg
        self.n = model.n_future
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache: Optional[KVCache] = None  # the cache of the latest generate() (for inspection)
        self._stacked: Optional[StackedHeads] = None
        self._stacked_key: Optional[tuple] = None

    # -- public ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> Generation:
        """Decode all prompts together (one batch); returns generated ids and statistics."""
        cfg = config
        self._check(prompts, cfg)
        gen = torch.Generator(device=self.device)  # own generator: leaves the global RNG alone
        if cfg.seed is not None:
            gen.manual_seed(cfg.seed)
        else:
            gen.seed()
        B = len(prompts)
        max_drafts = self._max_drafts(cfg)
        tree = None
        if cfg.mode == "tree" and max_drafts > 0:
            tree = DraftTree(cfg.tree_widths[:max_drafts]).to(self.device)
            max_drafts = tree.max_depth
        self._stack_drafting_heads(max_drafts)
        controller = None
        if cfg.adaptive and max_drafts:
            controller = DraftLengthController(max_drafts, self.cost_model,
                                               measured=self._pass_times.setdefault(max_drafts, {}),
                                               history=self._acceptance.get(max_drafts))
        step_tokens = tree.size if tree is not None else max_drafts + 1
        capacity = max(len(p) for p in prompts) + cfg.max_new_tokens + step_tokens + 2 * self.n + 2
        self.cache = KVCache(B, capacity, self.dtype, self.device)

        stats = RunStats(mode=cfg.mode, batch_size=B)
        stats.sequences = [SequenceStats(drafts_proposed=[0] * max_drafts, drafts_accepted=[0] * max_drafts)
                           for _ in range(B)]
        outputs: list[list[int]] = [[] for _ in range(B)]
        t0 = time.perf_counter()

        st = self._prefill(prompts, capacity, max_drafts, tree, cfg, gen)
        stats.forward_passes += 1
        drafted = 0  # drafts proposed for the next pass
        if tree is None:
            # Positions each drafting head has not run over yet (the most of any sequence), kept
            # on the host: what switching to k costs (see adaptive.py).
            lag = [max(len(p) for p in prompts)] * max_drafts
            drafted, work = max_drafts, [0] * (max_drafts + 1)
            if controller is not None:  # the drafting heads run over the whole prompt first
                work = _switch_work(lag, B, 0)
                drafted = controller.choose(B, list(range(B)), [cfg.max_new_tokens] * B, work)
            t_draft = time.perf_counter()
            stats.head_passes += self._draft(st, drafted, None, cfg, gen)
            lag[:drafted] = [0] * drafted
            if controller is not None:
                controller.record_drafting(drafted, B, time.perf_counter() - t_draft, catch_up=work[drafted])
        first = st.next_token.tolist()
        self._emit(st, [[t] for t in first], [1] * B, None, 0, outputs, stats, cfg)
        while st.rows.numel() > 0:
            batch, rows = st.rows.numel(), st.rows.tolist()
            t_pass = time.perf_counter()
            if tree is not None:
                emitted, n_acc = self._tree_step(st, tree, cfg)
                fed = tree.max_depth
            else:
                emitted, n_acc = self._chain_step(st, cfg, gen)
                fed = drafted
            # The acceptance decision: the step's one host synchronisation.
            decided = torch.cat([n_acc[:, None], emitted], dim=1).tolist()
            acc = [row[0] for row in decided]
            stats.forward_passes += 1
            stats.draft_lengths.append(fed)
            self._emit(st, [row[1:] for row in decided], [a + 1 for a in acc], acc, fed, outputs, stats, cfg)
            if tree is not None or st.rows.numel() == 0:
                continue
            t_decided = time.perf_counter()
            active = st.rows.tolist()
            if controller is not None:
                controller.record_verification(fed, batch, t_decided - t_pass, acc, rows)
                lag = [positions + max(acc) + 1 for positions in lag]
                drafted = controller.held(len(active))
                if drafted is None:
                    work = _switch_work(lag, len(active), max(acc) + 1)
                    drafted = controller.choose(len(active), active,
                                                [cfg.max_new_tokens - len(outputs[r]) for r in active], work)
            # Heads skipped by earlier passes first catch up on the positions they missed.
            catch_up = drafted > fed
            width = None if catch_up or self.model.heads_chain else max(acc) + 1
            stats.head_passes += self._draft(st, drafted, width, cfg, gen)
            if controller is not None:
                lag[:drafted] = [0] * drafted
                controller.record_drafting(drafted, len(active), time.perf_counter() - t_decided,
                                           work[drafted] if catch_up else 0)
        if controller is not None:
            self._acceptance[max_drafts] = controller.passed_on()
            stats.probe_passes = controller.probes
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.wall_time_s = time.perf_counter() - t0
        return Generation(tokens=outputs, stats=stats)

    def forward_step(self, tokens: torch.Tensor, start: torch.Tensor, heads: Sequence[int] = (1,),
                     depth: Optional[torch.Tensor] = None, step_mask: Optional[torch.Tensor] = None,
                     cache: Optional[KVCache] = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """One cached forward of ``tokens`` [B, T] written from ``start`` [B] through the trunk
        and the given independent heads (or head 1): {head: (state, normed)}. RoPE positions are
        ``start + depth`` (depth defaults to 0..T-1; a tree passes node depths)."""
        cache = self.cache if cache is None else cache
        self._stack_drafting_heads(max(heads) - 1)
        z, positions = self._trunk_pass(tokens, start, depth, step_mask, cache)
        return self.heads_forward(z, positions, heads, cache)

    def heads_forward(self, z, positions, heads, cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Head 1 as in greedy decoding; independent drafting heads 2..K+1 stacked, in one go
        (stacked by the latest ``generate`` or ``forward_step`` call)."""
        out = {1: self.model.head_forward(1, z, None, positions, cache)} if 1 in heads else {}
        drafting = [i for i in heads if i > 1]
        if drafting:
            if self.model.heads_chain or drafting != list(range(2, len(drafting) + 2)):
                raise ValueError(f"heads {drafting}: only independent drafting heads 2..K+1 run in the "
                                 "trunk's pass (causal heads draft one after the other)")
            if self._stacked is None or self._stacked.num_heads < len(drafting):
                self._stack_drafting_heads(len(drafting))
            cos, sin = self.model.rope(positions)
            states, normed = self._stacked(z, cos, sin, cache, num_heads=len(drafting))
            out.update({i: (states[k], normed[k]) for k, i in enumerate(drafting)})
        return out

    def _trunk_pass(self, tokens, start, depth=None, step_mask=None, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Announce the pass to the cache and run the trunk: (z [B, T, dim], RoPE positions [B, T])."""
        cache = self.cache if cache is None else cache
        T = tokens.shape[1]
        if depth is None:
            depth = torch.arange(T, device=self.device)
        positions = self._rope_positions(start[:, None] + depth[None, :])
        cache.prepare(start, T, step_mask)
        return self.model.trunk_forward(tokens, positions, cache), positions

    def _stack_drafting_heads(self, k: int) -> None:
        """Stack heads 2..k+1 (independent heads, k >= 1), again only if their weights changed
        (in place or replaced) since the last stacking. Checked once per call, not per pass."""
        if k < 1 or self.model.heads_chain:
            return
        heads = list(self.model.heads[1: k + 1])
        key = (k,) + tuple((p.data_ptr(), p._version, p.dtype) for h in heads for p in h.parameters())
        if key != self._stacked_key:
            first_free_layer_id = self.cfg.trunk_layers + self.n * self.cfg.head_layers
            self._stacked, self._stacked_key = StackedHeads(heads, first_free_layer_id), key

    # -- steps ----------------------------------------------------------------------------------

    def _prefill(self, prompts, capacity, max_drafts, tree, cfg, gen) -> _BatchState:
        B, P = len(prompts), max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        tokens = torch.zeros(B, capacity, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        rows = torch.arange(B, device=self.device)
        st = _BatchState(rows=torch.arange(B), length=lengths, next_token=lengths.new_zeros(B), tokens=tokens)
        if tree is None and max_drafts > 0:
            st.head_length = torch.zeros(B, self.n + 1, dtype=torch.long, device=self.device)
            if self.model.heads_chain:
                st.head_states = torch.zeros(B, self.n - 1, capacity, self.cfg.dim, dtype=self.dtype,
                                             device=self.device)
            else:
                st.trunk_states = torch.zeros(B, capacity, self.cfg.dim, dtype=self.dtype, device=self.device)
        z, positions = self._trunk_pass(tokens[:, :P], torch.zeros_like(lengths))
        # A tree pass runs every drafting head over every node; chain drafting runs afterwards.
        out = self.heads_forward(z, positions, self._heads(max_drafts) if tree is not None else [1], self.cache)
        last = lengths - 1
        st.next_token = self._choose(self.model.unembed(out[1][1][rows, last]), cfg, gen)
        st.tokens[rows, lengths] = st.next_token
        if st.trunk_states is not None:
            st.trunk_states[:, :P] = z
        self._store_head1_states(st, out, torch.zeros_like(lengths), P)
        if tree is not None:
            self._propose_tree(st, out, last, tree)
        return st

    def _chain_step(self, st: _BatchState, cfg, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the next token and the k drafts proposed for this pass (k = 0: a greedy pass);
        returns (emitted [B, k+1], accepted drafts [B]). Drafting for the next pass is separate
        (:meth:`_draft`), so that its length can be chosen after this pass's verdict."""
        B = st.rows.numel()
        rows = torch.arange(B, device=self.device)
        drafts = st.drafts
        k = drafts.shape[1]
        inputs = torch.cat([st.next_token[:, None], drafts], dim=1)  # [B, k+1]
        start = st.length
        slots = start[:, None] + torch.arange(k + 1, device=self.device)
        st.tokens.scatter_(1, slots, inputs)  # provisional: rejected ones get overwritten
        z, positions = self._trunk_pass(inputs, start)
        if st.trunk_states is not None:  # the drafting heads read z at the accepted positions
            st.trunk_states[rows[:, None], slots] = z
        out = self.heads_forward(z, positions, [1], self.cache)
        h1 = out[1][1]  # [B, k+1, dim]: head 1 verifies every input
        if cfg.sampling:
            p = filtered_probs(self.model.unembed(h1), cfg.temperature, cfg.top_p)
            n_acc, nxt = speculative_accept(p, st.draft_probs, drafts, gen)
        else:
            n_acc, nxt = self._verify_greedy(h1, drafts)
        emitted = torch.cat([drafts, nxt[:, None]], dim=1)
        emitted[rows, n_acc] = nxt  # accepted drafts, then head 1's token after them
        self._store_head1_states(st, out, start, k + 1)
        st.length = start + n_acc + 1
        st.next_token = nxt
        st.tokens[rows, st.length] = nxt
        return emitted, n_acc

    def _verify_greedy(self, h1: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy verification: head 1's token after every fed position, in one unembedding
        (no per-position host round trips, which a GPU would pay for in latency). Returns
        (accepted drafts [B], next token [B]): the agreeing prefix, then head 1's correction."""
        K = drafts.shape[1]
        greedy = self.model.unembed(h1).argmax(-1)  # [B, K+1]
        n_acc = leading_true(drafts == greedy[:, :K])
        nxt = greedy.gather(1, n_acc[:, None]).squeeze(1)
        return n_acc, nxt

    def _tree_step(self, st: _BatchState, tree: DraftTree, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        B = st.rows.numel()
        rows = torch.arange(B, device=self.device)
        # Node tokens: the root is next_token; a depth-d node is head d+1's rank-r candidate.
        cand = st.candidates[:, (tree.depth[1:] - 1), tree.rank[1:]]  # [B, size-1]
        node_tokens = torch.cat([st.next_token[:, None], cand], dim=1)
        start = st.length
        z, positions = self._trunk_pass(node_tokens, start, tree.depth, tree.mask)
        out = self.heads_forward(z, positions, self._heads(tree.max_depth), self.cache)
        greedy = self.model.unembed(out[1][1]).argmax(-1)  # [B, size]: head 1's token after each node
        accepted = torch.zeros(B, tree.size, dtype=torch.bool, device=self.device)
        accepted[:, 0] = True
        for level in tree.levels:  # a node is accepted iff its parent is and it is the parent's greedy token
            par = tree.parent[level]
            accepted[:, level] = accepted[:, par] & (node_tokens[:, level] == greedy[:, par])
        # Siblings are distinct tokens, so at most one node per depth is accepted: the deepest
        # accepted node ends the accepted path.
        deepest = (accepted.long() * tree.depth).argmax(dim=1)
        n_acc = tree.depth[deepest]
        path = tree.ancestors[deepest]  # [B, D+1], path[:, 0] = root
        nxt = greedy[rows, deepest]
        emitted = torch.cat([node_tokens.gather(1, path[:, 1:]), nxt[:, None]], dim=1)
        emitted[rows, n_acc] = nxt
        # Pack the accepted path into consecutive slots (a few slots per layer; the rest of the
        # tree is rolled back by the length). Depth j's node moves from slot start+node to start+j.
        depths = torch.arange(1, tree.max_depth + 1, device=self.device)
        dst = start[:, None] + depths
        src = torch.where(depths[None] <= n_acc[:, None], start[:, None] + path[:, 1:], dst)
        self.cache.move(src, dst)
        st.tokens.scatter_(1, start[:, None] + torch.arange(tree.max_depth + 2, device=self.device),
                           torch.cat([st.next_token[:, None], emitted], dim=1))
        st.length = start + n_acc + 1
        st.next_token = nxt
        self._propose_tree(st, out, deepest, tree)
        return emitted, n_acc

    # -- drafting -------------------------------------------------------------------------------

    def _heads(self, n_drafts: int) -> list[int]:
        """Heads run in the trunk's pass: head 1, plus the drafting heads when they read the
        trunk (independent heads); causal heads draft in their own sequential passes."""
        if n_drafts and not self.model.heads_chain:
            return list(range(1, n_drafts + 2))
        return [1]

    def _propose_tree(self, st, out, idx, tree) -> None:
        """Tree candidates: the top tokens of heads 2..D+1 at input index idx [B] of this pass."""
        rows = torch.arange(st.rows.numel(), device=self.device)
        # One unembedding for all drafting heads: the shared matrix is read once per step.
        states = torch.stack([out[i][1][rows, idx] for i in range(2, tree.max_depth + 2)], dim=1)  # [B, D, dim]
        st.candidates = self.model.unembed(states).topk(tree.max_width, dim=-1).indices

    def _store_head1_states(self, st, out, start, T) -> None:
        if st.head_states is not None:
            rows = torch.arange(st.rows.numel(), device=self.device)[:, None]
            st.head_states[rows, 0, start[:, None] + torch.arange(T, device=self.device)] = out[1][0]

    def _draft(self, st: _BatchState, k: int, width: Optional[int], cfg, gen) -> int:
        """Drafts of heads 2..k+1 at the last committed position, for the next pass (k = 0:
        none). ``width``: positions the independent heads run over, when the caller knows it
        (no head lags: the accepted inputs of the pass); None computes it. Returns the number
        of sequential (causal) head passes run."""
        if k == 0:
            st.drafts = st.next_token.new_zeros(st.rows.numel(), 0)
            st.draft_probs = None
            return 0
        if self.model.heads_chain:
            return self._causal_drafting(st, k, cfg, gen)
        self._independent_drafting(st, k, width, cfg, gen)
        return 0

    def _catch_up_window(self, st: _BatchState, heads: slice, width: Optional[int]):
        """Positions [start, start + width) per sequence that bring the given heads up to the
        last committed position: width covers every sequence's first not-final slot; each
        window ends at that sequence's last position (it starts earlier where needed, which only
        recomputes final slots, so padding never runs past the cache). Returns (last, start,
        positions [B, width], inputs' positions clamped to <= last)."""
        last = st.length - 1
        if width is None:
            width = int((last - st.head_length[:, heads].min(dim=1).values + 1).max())
        start = (last - width + 1).clamp(min=0)
        pos = start[:, None] + torch.arange(width, device=self.device)
        return last, start, pos, torch.minimum(pos, last[:, None])

    def _independent_drafting(self, st: _BatchState, k: int, width: Optional[int], cfg, gen) -> None:
        """Heads 2..k+1 (stacked) over the trunk outputs since their first not-final slot, then
        their drafts at the last committed position in one unembedding. Heads skipped by earlier
        passes (a shorter draft was chosen) catch up here; otherwise the window is the accepted
        inputs of the last pass."""
        rows = torch.arange(st.rows.numel(), device=self.device)
        last, start, pos, inside = self._catch_up_window(st, slice(2, k + 2), width)
        z = st.trunk_states[rows[:, None], inside]
        self.cache.prepare(start, pos.shape[1])
        cos, sin = self.model.rope(self._rope_positions(pos))
        _, normed = self._stacked(z, cos, sin, self.cache, num_heads=k)  # [k, B, W, dim]
        logits = self.model.unembed(normed[:, rows, last - start].transpose(0, 1))  # [B, k, V]
        if cfg.sampling:
            st.draft_probs = filtered_probs(logits, cfg.temperature, cfg.top_p)
            st.drafts = sample(st.draft_probs, gen)
        else:
            st.drafts, st.draft_probs = logits.argmax(-1), None
        st.head_length[:, 2: k + 2] = st.length[:, None]

    def _causal_drafting(self, st: _BatchState, k: int, cfg, gen) -> int:
        """Causal heads: bring heads 2..k+1 up to the last committed position and draft, one
        head after the other. Returns the number of head passes run."""
        B = st.rows.numel()
        rows = torch.arange(B, device=self.device)
        drafts, probs = [], []
        for i in range(2, k + 2):
            # From head i's first not-final slot (slots before it were computed with known
            # tokens only) to the last committed position.
            last, start, pos, inside = self._catch_up_window(st, slice(i, i + 1), None)
            x_in = st.head_states[rows[:, None], i - 2, inside]  # head i-1's states
            shifted = st.tokens.gather(1, inside + i - 1)  # token t+i-1 (next_token or a draft at the end)
            self.cache.prepare(start, pos.shape[1])
            state, normed = self.model.head_forward(i, x_in, shifted, self._rope_positions(pos), self.cache)
            if i < self.n:  # head i+1 reads this one's states (now, or when it catches up later)
                st.head_states[rows[:, None], i - 1, pos] = state  # padding lands beyond `last`
            logits = self.model.unembed(normed[rows, last - start])
            if cfg.sampling:
                q = filtered_probs(logits, cfg.temperature, cfg.top_p)
                d = sample(q, gen)
                probs.append(q)
            else:
                d = logits.argmax(-1)
            drafts.append(d)
            st.tokens[rows, last + i] = d  # head i+1 embeds it
            # Head i at position t needs tokens up to t+i-1; known up to last+1 (next_token).
            st.head_length[:, i] = (last + 3 - i).clamp(min=0)
        st.drafts = torch.stack(drafts, dim=1)
        st.draft_probs = torch.stack(probs, dim=1) if probs else None
        return k

    # -- bookkeeping ----------------------------------------------------------------------------

    def _emit(self, st, emitted, counts, n_acc, fed, outputs, stats, cfg) -> None:
        """Append each sequence's new tokens, stop at EOS / max tokens, drop finished rows.
        emitted [B][...], counts [B] and n_acc [B] (None for the prompt pass) are host lists;
        ``fed``: drafts fed in this pass."""
        finished = []
        for b, r in enumerate(st.rows.tolist()):
            s, out = stats.sequences[r], outputs[r]
            s.forward_passes += 1
            if n_acc is not None:
                for j in range(fed):
                    s.drafts_proposed[j] += 1
                    s.drafts_accepted[j] += int(n_acc[b] > j)
            done = False
            for t in emitted[b][: counts[b]]:
                out.append(t)
                if cfg.eos_id is not None and t == cfg.eos_id:
                    s.finish_reason, done = "eos", True
                elif len(out) >= cfg.max_new_tokens:
                    s.finish_reason, done = "length", True
                if done:
                    break
            s.tokens_generated = len(out)
            finished.append(done)
        if any(finished):
            keep = torch.tensor([b for b, f in enumerate(finished) if not f], dtype=torch.long)
            st.select(keep)
            self.cache.select_rows(keep.to(self.device))

    def _rope_positions(self, pos: torch.Tensor) -> torch.Tensor:
        # Only padding and drafts past the last token that can be emitted go beyond the RoPE
        # table (generate() checks prompt + max_new_tokens); their outputs are never used.
        return pos.clamp(max=self.cfg.max_seq_len - 1)

    def _max_drafts(self, cfg: GenerationConfig) -> int:
        """Most drafts a pass of this run feeds: the model's n-1 drafting heads, or num_drafts."""
        if cfg.mode in ("greedy", "sample"):
            return 0
        return min(self.n - 1, cfg.num_drafts) if isinstance(cfg.num_drafts, int) else self.n - 1

    def _choose(self, logits, cfg, gen) -> torch.Tensor:
        if cfg.sampling:
            return sample(filtered_probs(logits, cfg.temperature, cfg.top_p), gen)
        return logits.argmax(-1)

    def _check(self, prompts, cfg) -> None:
        if not prompts:
            raise ValueError("no prompts")
        for p in prompts:
            if len(p) == 0:
                raise ValueError("empty prompt: every prompt needs at least one token (e.g. BOS)")
            if min(p) < 0 or max(p) >= self.cfg.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
            if len(p) + cfg.max_new_tokens > self.cfg.max_seq_len:
                raise ValueError(f"prompt of {len(p)} tokens + max_new_tokens {cfg.max_new_tokens} exceeds "
                                 f"model.max_seq_len={self.cfg.max_seq_len}")
        if isinstance(cfg.num_drafts, int) and cfg.num_drafts > self.n - 1:
            raise ValueError(f"num_drafts={cfg.num_drafts}, but a model with n_future={self.n} has "
                             f"{self.n - 1} drafting heads")
        if cfg.mode == "tree" and self.model.heads_chain and self.n > 1:
            raise NotImplementedError(
                "tree mode needs independent heads (transformer or linear); causal heads draft one "
                "token at a time through the chain, so use mode self_speculative with them")


def _switch_work(lag: list[int], batch: int, normal: int) -> list[int]:
    """For k = 0..K: head positions drafting k tokens would first run over beyond the ``normal``
    window (the inputs the last pass accepted): k heads x the sequences x the positions the most
    lagging of heads 2..k+1 missed; 0 where no head lags (``lag[h]``: head h+2's missed positions)."""
    out, worst = [0], 0
    for k, positions in enumerate(lag, start=1):
        worst = max(worst, positions)
        out.append(k * batch * worst if worst > normal else 0)
    return out


def generate(model: MTPTransformer, prompts: Sequence[Sequence[int]], **config) -> Generation:
    """Convenience wrapper: ``generate(model, prompts, mode="self_speculative", max_new_tokens=64)``."""
    return Decoder(model).generate(prompts, GenerationConfig(**config))
