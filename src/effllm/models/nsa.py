"""Native Sparse Attention (Yuan et al. 2025, arXiv 2502.11089), in plain PyTorch.

Each query attends through three branches whose outputs a per-head sigmoid gate mixes:

1. compressed: every block of ``l`` keys/values (a block starts every ``d`` tokens) is squeezed
   into one key/value by a small MLP; a query sees the blocks that end at or before it;
2. selected: the compressed attention probabilities, summed over the query heads of a GQA group,
   rank blocks of ``l'`` tokens; the group attends to all tokens of its top ``n`` blocks;
3. sliding window: the last ``w`` tokens.

Nothing here computes a dense ``T x S`` score matrix behind a mask. Queries are processed in
chunks; the window branch slices the ``chunk + w`` keys it needs and the selected branch gathers
only the blocks its queries selected, so work and memory grow as ``T (T/d + n l' + w)``.

Choices the paper leaves open (see also the class docstring):

* RoPE rotates q/k of the selected and window branches only. The compressed branch works on
  un-rotated q/k: an MLP does not commute with rotations, so compressing rotated keys would tie the
  compressed scores to absolute positions. Its order information is the learned intra-block position
  embedding plus causality over whole blocks.
* The selected set always holds the query's own block; the first and the neighbouring blocks are not
  forced (the window branch covers the local context and the scores can still pick block 0).
* A query with no complete compression block yet gets exactly zero from the compressed branch.

KV cache: raw (rotated) K/V go through ``cache.update``; the compressed keys/values and the few
un-rotated keys of the not yet complete next block live on ``cache.layers[layer_idx]`` as
``nsa_ck``, ``nsa_cv``, ``nsa_kpend`` and grow only when a block completes, so a decode step costs
``O(S/d + n l' + w)`` attention work. Beam-search reordering and ``crop`` do not know about these
three attributes (greedy/sampled ``generate`` is fine).
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.models.config import DecoderConfig
from effllm.models.layers import AttentionInputs
from effllm.models.positions import apply_rope


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the visible entries (every row must have one).

    A finite fill value, not -inf, so that no 0 * inf can turn into NaN, forward or backward.
    """
    return scores.masked_fill(~visible, torch.finfo(scores.dtype).min).softmax(-1)


@torch.no_grad()
def pack_tiles(key: torch.Tensor, n_keys: int, tile: int):
    """Pack items (here: query/block pairs) into tiles of ``tile`` slots that share one key.

    Returns, for ``key`` ``[P]`` with values in ``[0, n_keys)``: each item's slot ``[P]``, the item
    in each slot ``[tiles * tile]`` (empty slots point at item 0; their results are never read) and
    each tile's key ``[tiles]``.
    """
    if tile == 1:  # one item per tile (a decode step): nothing to pack
        items = torch.arange(key.numel(), device=key.device)
        return items, items, key
    count = torch.bincount(key, minlength=n_keys)
    tiles = -(-count // tile)
    order = key.argsort()
    sorted_key = key[order]
    rank = torch.arange(key.numel(), device=key.device) - (count.cumsum(0) - count)[sorted_key]
    slot = torch.empty_like(key)
    slot[order] = ((tiles.cumsum(0) - tiles)[sorted_key] + rank // tile) * tile + rank % tile
    item_of_slot = key.new_zeros(int(tiles.sum()) * tile)
    item_of_slot[slot] = torch.arange(key.numel(), device=key.device)
    tile_key = torch.repeat_interleave(torch.arange(n_keys, device=key.device), tiles)
    return slot, item_of_slot, tile_key


class NativeSparseAttention(nn.Module):
    """Gated three-branch NSA with grouped-query heads.

    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` are as in grouped-query attention, so peft and
    bitsandbytes treat them alike. ``k_compress``/``v_compress`` map a block to one vector as
    ``mean(block) + MLP(block + intra-block position)``: the mean makes the compressed branch (and
    so the block selection) meaningful from the first step, the MLP learns the rest.
    ``branch_gate`` gives each head three sigmoid weights from the layer input.
    """

    query_chunk = 128  # queries processed together; bounds every intermediate to chunk x (...)
    tile = 16  # queries per key tile in the selected branch

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = d_h = config.head_dim
        self.cmp_block = config.nsa_compress_block  # l
        self.cmp_stride = config.nsa_compress_stride  # d
        self.sel_block = config.nsa_select_block  # l'
        self.n_sel = config.nsa_num_selected  # n
        self.window = config.nsa_window  # w
        if not 0 < self.cmp_stride <= self.cmp_block:
            raise ValueError(f"nsa_compress_stride {self.cmp_stride} must be in 1 … "
                             f"nsa_compress_block {self.cmp_block}")
        if min(self.sel_block, self.n_sel, self.window) < 1:
            raise ValueError("nsa_select_block, nsa_num_selected and nsa_window must be >= 1")
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * d_h, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv * d_h, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv * d_h, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d_h, hidden, bias=False)
        self.branch_gate = nn.Linear(hidden, 3 * self.n_heads, bias=False)
        # Shared by the KV heads. The input is a whole block (l D wide), so the hidden layer is
        # kept at D: l D^2 parameters per MLP, small next to the projections at real model sizes.
        self.k_compress = nn.Sequential(nn.Linear(self.cmp_block * d_h, d_h), nn.SiLU(),
                                        nn.Linear(d_h, d_h))
        self.v_compress = nn.Sequential(nn.Linear(self.cmp_block * d_h, d_h), nn.SiLU(),
                                        nn.Linear(d_h, d_h))
        self.k_block_pos = nn.Parameter(torch.empty(self.n_kv, self.cmp_block, d_h))
        self.v_block_pos = nn.Parameter(torch.empty(self.n_kv, self.cmp_block, d_h))
        self.reset_parameters_(config.initializer_range)

    def reset_parameters_(self, std: float) -> None:
        """The parameters that are not inside an nn.Linear (the decoder initialises those)."""
        nn.init.normal_(self.k_block_pos, std=std)
        nn.init.normal_(self.v_block_pos, std=std)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache) -> torch.Tensor:
        b, t, _ = x.shape
        o_cmp, o_slc, o_win = self.branches(x, inputs, cache)  # each [B, H, T, D]
        gate = torch.sigmoid(self.branch_gate(x)).view(b, t, self.n_heads, 3, 1).transpose(1, 2)
        y = gate[..., 0, :] * o_cmp + gate[..., 1, :] * o_slc + gate[..., 2, :] * o_win
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def branches(self, x: torch.Tensor, inputs: AttentionInputs, cache):
        """The branch outputs ``[B, H, T, D]`` (compressed, selected, window), before gating."""
        b, t, _ = x.shape
        g, r, d_h = self.n_kv, self.group, self.head_dim
        self._check_inputs(inputs)
        # Query head h belongs to KV group h // r, as in grouped-query attention.
        q = self.q_proj(x).view(b, t, g, r, d_h).permute(0, 2, 3, 1, 4)  # [B, G, r, T, D]
        k = self.k_proj(x).view(b, t, g, d_h).transpose(1, 2)  # [B, G, T, D]
        v = self.v_proj(x).view(b, t, g, d_h).transpose(1, 2)
        q = q * self.head_dim**-0.5  # softmax scale, applied once
        q_raw, k_raw = q, k  # un-rotated, for the compressed branch
        if inputs.rope is not None:
            cos, sin = inputs.rope  # [B, 1, T, D]
            q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos, sin)
        layer = None
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # all S = past + T positions
            layer = cache.layers[self.layer_idx]
        ck, cv = self._compressed_kv(k_raw, v, layer)  # [B, G, Nc, D]
        s = k.shape[-2]
        past = s - t
        k_bg, v_bg = k.flatten(0, 1), v.flatten(0, 1)  # [B G, S, D]; a view for a cache's tensors
        outs = []
        for c0 in range(0, t, self.query_chunk):
            c1 = min(t, c0 + self.query_chunk)
            pos = torch.arange(past + c0, past + c1, device=x.device)  # query positions
            o_cmp, p_cmp = self._compressed(q_raw[:, :, :, c0:c1], ck, cv, pos)
            o_slc = self._selected(q[:, :, :, c0:c1], k_bg, v_bg, p_cmp, pos, s)
            o_win = self._window(q[:, :, :, c0:c1], k, v, pos)
            outs.append((o_cmp, o_slc, o_win))
        return tuple(torch.cat(o, dim=3).reshape(b, self.n_heads, t, d_h) for o in zip(*outs))

    # -- inputs ------------------------------------------------------------------------------

    @staticmethod
    def _check_inputs(inputs: AttentionInputs) -> None:
        """Right padding is harmless (pad keys come after every real query, so causality hides
        them). Padding before real tokens (left padding) would shift the block boundaries, which
        are counted from the first cache slot."""
        if inputs.bias is not None:
            raise ValueError("NSA takes no additive score bias (ALiBi, T5 relative)")
        mask = inputs.attention_mask
        if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("NSA does not support left-padded batches; pad on the right "
                             "(or run the prompts one by one)")

    # -- branch 1: compression ---------------------------------------------------------------

    def _compress(self, blocks: torch.Tensor, pos: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        """``[B, G, N, l, D]`` blocks -> ``[B, G, N, D]``."""
        return blocks.mean(-2) + mlp((blocks + pos[:, None]).flatten(-2))

    def _compressed_kv(self, k_raw: torch.Tensor, v: torch.Tensor, layer):
        """Compressed keys/values of every complete block among the S positions.

        Blocks already compressed are taken from the cache; only blocks completed by the new tokens
        are computed. ``k_raw`` holds the new un-rotated keys, ``v`` all S values.
        """
        b, g, _, d_h = k_raw.shape
        l, d = self.cmp_block, self.cmp_stride
        if layer is not None and v.shape[-2] > k_raw.shape[-2]:  # a past: continue its blocks
            ck, cv = layer.nsa_ck, layer.nsa_cv
            pending = torch.cat([layer.nsa_kpend, k_raw], dim=-2)  # un-rotated keys from n_old * d
        else:
            ck = cv = k_raw.new_zeros(b, g, 0, d_h)
            pending = k_raw
        n_old, s = ck.shape[-2], v.shape[-2]
        start = n_old * d
        n_new = (s - start - l) // d + 1 if s - start >= l else 0
        if n_new:
            kb = pending.unfold(-2, l, d).transpose(-1, -2)  # [B, G, n_new, l, D] (views)
            vb = v[:, :, start:].unfold(-2, l, d).transpose(-1, -2)
            ck = torch.cat([ck, self._compress(kb, self.k_block_pos, self.k_compress)], dim=-2)
            cv = torch.cat([cv, self._compress(vb, self.v_block_pos, self.v_compress)], dim=-2)
        if layer is not None:
            layer.nsa_ck, layer.nsa_cv = ck, cv
            # Keys of the next, incomplete blocks (< l tokens); a copy, so no big tensor stays
            # alive through a view.
            layer.nsa_kpend = pending[:, :, n_new * d:].clone()
        return ck, cv

    def _compressed(self, q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, pos: torch.Tensor):
        """Attention over compressed blocks that end at or before each query.

        Returns the output ``[B, G, r, C, D]`` and the probabilities ``[B, G, r, C, Nc]``.
        """
        b, g, r, c, d_h = q.shape
        n_blocks = ck.shape[-2]
        block_end = torch.arange(n_blocks, device=q.device) * self.cmp_stride + self.cmp_block - 1
        visible = block_end <= pos[:, None]  # [C, Nc]
        scores = q.reshape(b, g, r * c, d_h) @ ck.transpose(-1, -2)
        # A query before the first complete block sees nothing: its row is zeroed, not NaN.
        p = masked_softmax(scores.view(b, g, r, c, n_blocks), visible) * visible.any(-1, True)
        return (p.view(b, g, r * c, n_blocks) @ cv).view(b, g, r, c, d_h), p

    # -- branch 2: selection -----------------------------------------------------------------

    @torch.no_grad()
    def _select_blocks(self, p_cmp: torch.Tensor, pos: torch.Tensor, s: int):
        """Top-n selection blocks per query and group: indices and validity ``[B, G, C, n]``.

        A compressed block's probability counts towards each selection block in proportion to the
        tokens they share. For l and l' multiples of d this is the trapezoid weighting of the
        paper's Eq. 9 double sum (up to its index offset); it also covers other sizes. The query's
        own block is always kept; blocks after it never are.
        """
        l, d, ls = self.cmp_block, self.cmp_stride, self.sel_block
        imp = p_cmp.sum(2)  # [B, G, C, Nc]: one ranking per GQA group
        n_cmp, n_blocks = imp.shape[-1], -(-s // ls)
        start = torch.arange(n_cmp, device=imp.device)[:, None] * d
        # The selection blocks j a compressed block can touch, and how many tokens it shares.
        j = start // ls + torch.arange((l - 1) // ls + 2, device=imp.device)  # [Nc, touched]
        shared = torch.minimum(start + l, (j + 1) * ls) - torch.maximum(start, j * ls)
        shared = shared.clamp(min=0)
        scores = imp.new_zeros(*imp.shape[:-1], n_blocks)
        scores.index_add_(-1, j.flatten().clamp(max=n_blocks - 1),
                          (imp[..., None] * shared.to(imp.dtype)).flatten(-2))
        own = (pos // ls)[:, None]
        block = torch.arange(n_blocks, device=imp.device)
        scores = scores.masked_fill(block > own, -torch.inf).masked_fill(block == own, torch.inf)
        top = scores.topk(min(self.n_sel, n_blocks), dim=-1)
        return top.indices, top.values > -torch.inf

    def _selected(self, q, k_bg, v_bg, p_cmp, pos, s):
        """Full attention over the tokens of each query's ``n`` selected blocks.

        Gathering ``n l'`` keys per query would copy ``l' / r`` times more key data than there are
        scores, and its backward (a scatter-add of the same size) dominates the training step on
        CPU. So the (query, block) pairs are sorted by block and packed into tiles of up to
        ``tile`` queries that share one block: each tile gathers its block once and does one
        ``[tile r, D] x [D, l']`` product. The scores go back to per-query order for one softmax
        over all selected tokens, then the probabilities go through the same tiles for the values.
        """
        b, g, r, c, d_h = q.shape
        ls = self.sel_block
        idx, valid = self._select_blocks(p_cmp, pos, s)  # [B, G, C, n]
        n = idx.shape[-1]
        token = idx[..., None] * ls + torch.arange(ls, device=q.device)  # [B, G, C, n, l']
        visible = (valid[..., None] & (token <= pos[:, None, None])).flatten(-2)  # [B, G, C, n l']
        n_blocks, tile = -(-s // ls), min(self.tile, c)
        with torch.no_grad():
            block = torch.arange(b * g, device=q.device).view(b, g, 1, 1) * n_blocks + idx
            slot, pair_of_slot, tile_block = pack_tiles(block.flatten(), b * g * n_blocks, tile)
            tile_bg = (tile_block // n_blocks)[:, None]
            # Each tile's l' tokens (clamped at the sequence end, where causality masks them).
            tile_token = (tile_block % n_blocks * ls)[:, None] + torch.arange(ls, device=q.device)
            tile_token = tile_token.clamp(max=s - 1)
        k_tile, v_tile = k_bg[tile_bg, tile_token], v_bg[tile_bg, tile_token]  # [tiles, l', D]
        q_rows = q.transpose(2, 3).reshape(b * g * c, r * d_h)  # one row per query: its r heads
        q_tile = q_rows.index_select(0, pair_of_slot // n).view(-1, tile * r, d_h)
        scores = (q_tile @ k_tile.transpose(-1, -2)).view(-1, r * ls).index_select(0, slot)
        scores = scores.view(b, g, c, n, r, ls).transpose(3, 4).reshape(b, g, c, r, n * ls)
        p = masked_softmax(scores, visible[:, :, :, None])  # [B, G, C, r, n l']
        p = p.view(b, g, c, r, n, ls).transpose(3, 4).reshape(-1, r * ls)  # one row per pair
        p_tile = p.index_select(0, pair_of_slot).view(-1, tile * r, ls)
        out = (p_tile @ v_tile).view(-1, r * d_h).index_select(0, slot)
        return out.view(b, g, c, n, r, d_h).sum(3).transpose(2, 3)  # [B, G, r, C, D]

    # -- branch 3: sliding window ------------------------------------------------------------

    def _window(self, q, k, v, pos):
        """Causal attention over the last w tokens, from the one key slice a chunk needs."""
        b, g, r, c, d_h = q.shape
        lo, hi = max(0, int(pos[0]) - self.window + 1), int(pos[-1]) + 1
        k_pos = torch.arange(lo, hi, device=q.device)
        visible = (k_pos <= pos[:, None]) & (k_pos > pos[:, None] - self.window)  # [C, L]
        scores = q.reshape(b, g, r * c, d_h) @ k[:, :, lo:hi].transpose(-1, -2)
        p = masked_softmax(scores.view(b, g, r, c, hi - lo), visible)
        return (p.view(b, g, r * c, hi - lo) @ v[:, :, lo:hi]).view(b, g, r, c, d_h)
