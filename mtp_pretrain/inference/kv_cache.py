"""A preallocated key/value cache with per-sequence lengths, for trunk and head blocks alike.

Layout: one ``[B, H_kv, capacity, head_dim]`` key and value buffer per attention layer (trunk
blocks and head blocks each have their own ``layer_id``), allocated on the first write so that
layers a mode never runs (e.g. heads 2..n under plain greedy decoding) cost nothing.

The cache itself holds no "length": every forward pass is announced with :meth:`prepare`, which
says, per sequence, where its new tokens start (``start[b]`` = how many positions of that
sequence are committed for the layers about to run) and how the new tokens see each other (a
causal chain, or a draft tree). Then each layer's :meth:`update`

* scatters the new keys/values into slots ``start[b] .. start[b] + T - 1``, and
* returns the cached keys/values plus a boolean mask: a new query attends to every committed
  slot ``< start[b]`` and to the new slots the step mask allows; nothing else.

Rollback is therefore free: the decoder keeps the committed lengths and simply does not count
rejected positions; whatever they wrote is beyond the length, masked out, and overwritten by the
next write to those slots. Nothing is copied. The only copy is :meth:`move`, which packs an
accepted *tree* path (a few slots per layer) into consecutive positions, and :meth:`select_rows`,
which drops finished sequences from the batch.

Head-stacked layers (``stacked_heads.py``: K drafting heads run as one batched computation, the
heads folded into the batch) write ``K * B`` rows: copy ``c`` of sequence ``b`` is row
``c * B + b``. Such a layer's buffer holds K copies of the batch, and every per-sequence
operation (slots, mask, move, select) applies to each copy. A pass may run only the first k
heads of a stack (an adaptive draft length): it writes and reads the first k copies; the buffer
grows when a pass needs more copies than it holds.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    def __init__(self, batch_size: int, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.batch_size = batch_size
        self.capacity = capacity
        self.dtype = dtype
        self.device = torch.device(device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # Set by prepare(), shared by every layer of the forward pass that follows.
        self._slots: Optional[torch.Tensor] = None  # [B, T] write positions
        self._mask: Optional[torch.Tensor] = None  # [B, 1, T, S] True = attend
        self._extent = 0  # S: slots any query of this step can see
        self._per_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # copies -> (slots, mask)

    # -- per forward pass -------------------------------------------------------------------------

    def prepare(self, start: torch.Tensor, n_new: int, step_mask: Optional[torch.Tensor] = None) -> None:
        """Announce a forward pass of ``n_new`` tokens per sequence written from ``start`` [B].

        ``step_mask`` [T, T] (True = query i may see new token j) defaults to causal. It must
        let every query see itself, so that no row of the mask is empty (padding queries
        included): an all-masked row would make NaNs that the zero attention weights of other
        rows would still multiply into their outputs.
        """
        T = n_new
        start = start.to(self.device, torch.long)
        if start.shape != (self.batch_size,):
            raise ValueError(f"start must have shape ({self.batch_size},), got {tuple(start.shape)}")
        S = int(start.max()) + T
        if S > self.capacity:
            raise ValueError(f"KV cache overflow: writing up to slot {S} of {self.capacity}")
        self._slots = start[:, None] + torch.arange(T, device=self.device)
        cols = torch.arange(S, device=self.device)
        if step_mask is None:
            # Causal: query i (at slot start + i) sees every slot up to its own (one comparison
            # instead of composing the committed and new parts).
            self._mask = (cols[None, None, :] <= self._slots[:, :, None]).unsqueeze(1)
        else:
            step_mask = step_mask.to(self.device)
            if not bool(step_mask.diagonal().all()):
                raise ValueError("step_mask must let every new token attend to itself")
            rel = cols[None, :] - start[:, None]  # [B, S]
            committed = rel < 0
            new = (rel >= 0) & (rel < T)
            new_visible = step_mask[:, rel.clamp(0, T - 1)].permute(1, 0, 2)  # [B, T, S]
            self._mask = (committed[:, None, :] | (new[:, None, :] & new_visible)).unsqueeze(1)
        self._extent = S
        self._per_copies = {1: (self._slots, self._mask)}

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention-side protocol (``mtp_pretrain.model.transformer.AttentionCache``)."""
        if self._slots is None:
            raise RuntimeError("KVCache.update called before prepare()")
        B, H, T, hd = k.shape
        if T != self._slots.shape[1] or B % self.batch_size:
            raise ValueError(f"k has batch {B} and {T} new tokens; prepare() announced "
                             f"{self.batch_size} (or a multiple, for stacked heads) and {self._slots.shape[1]}")
        held = self.keys[layer_id].shape[0] if layer_id in self.keys else 0
        if held < B:  # first write, or more head copies than before: the new copies start empty
            shape = (B - held, H, self.capacity, hd)
            new_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            new_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.keys[layer_id] = torch.cat([self.keys[layer_id], new_k]) if held else new_k
            self.values[layer_id] = torch.cat([self.values[layer_id], new_v]) if held else new_v
        kb, vb = self.keys[layer_id][:B], self.values[layer_id][:B]
        slots, mask = self._for_copies(B // self.batch_size)
        rows = torch.arange(B, device=self.device)[:, None]
        # Advanced indices around a slice: the indexed view is [B, T, H, hd].
        kb[rows, :, slots] = k.transpose(1, 2).to(self.dtype)
        vb[rows, :, slots] = v.transpose(1, 2).to(self.dtype)
        S = self._extent
        return kb[:, :, :S], vb[:, :, :S], mask

    def _for_copies(self, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write slots and mask of this step repeated for ``copies`` copies of the batch (built
        once per step, shared by all layers of a head-stacked module)."""
        if copies not in self._per_copies:
            self._per_copies[copies] = (self._slots.repeat(copies, 1), self._mask.repeat(copies, 1, 1, 1))
        return self._per_copies[copies]

    # -- between forward passes ---------------------------------------------------------------------

    def move(self, src: torch.Tensor, dst: torch.Tensor, layer_ids=None) -> None:
        """Copy slots ``src`` [B, K] to slots ``dst`` [B, K] in every (or the given) layer:
        packs an accepted tree path into consecutive positions. Reads before writing, so
        overlapping source and destination sets are fine."""
        for lid in (self.keys if layer_ids is None else layer_ids):
            copies = self.keys[lid].shape[0] // self.batch_size
            rows = torch.arange(copies * self.batch_size, device=self.device)[:, None]
            s, d = src.repeat(copies, 1), dst.repeat(copies, 1)
            for buf in (self.keys[lid], self.values[lid]):
                buf[rows, :, d] = buf[rows, :, s].clone()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the sequences ``rows`` (e.g. drop finished ones). Copies the kept rows."""
        rows = rows.to(self.device)
        for lid in list(self.keys):
            copies = self.keys[lid].shape[0] // self.batch_size
            keep = (torch.arange(copies, device=self.device)[:, None] * self.batch_size + rows).flatten()
            self.keys[lid] = self.keys[lid].index_select(0, keep)
            self.values[lid] = self.values[lid].index_select(0, keep)
        self.batch_size = int(rows.numel())
        self._slots = self._mask = None
        self._per_copies = {}

    def layer_ids(self) -> list[int]:
        return sorted(self.keys)
