"""Building blocks shared by the pretrained architectures: norms, rotary, attention, masks.

Shapes: B batch, S query positions, K key positions (the new ones; with a KV cache its
whole capacity), H query heads, G key/value heads, e head width, d model width.

A :class:`Context` carries what every attention layer of one forward call needs and
what does not change from layer to layer or loop to loop: the rotary angles of the
positions, the boolean attention masks (full and sliding-window), the padding mask and
the KV cache. Building it once per call keeps the loop body free of recomputation.

Padding convention: ``attention_mask`` (B, S_total) is 1 for real tokens and 0 for
padding, anywhere in the sequence. A position's rotary index is the number of real
tokens before it (``cumsum - 1``, as transformers does), so a left-padded prompt gets
the positions it would have alone. Real queries never attend to padded keys; a padded
query attends only to itself (so no softmax row is empty), and the models keep the state
of padded positions at zero, so they add nothing to residuals, norms or Jacobians.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Context",
    "KVCache",
    "RMSNorm",
    "attend",
    "make_context",
    "rotary_angles",
    "rotate_half_pairs",
    "rotate_interleaved_pairs",
]


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in float32 and cast back.

    Args:
        dim: the normalised (last) dimension d.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., d) in the dtype of ``x``."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# --------------------------------------------------------------------------- rotary


def rotary_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Cosines and sines of ``position * base^(-2i / head_dim)`` in float32.

    Args:
        positions: (B, S) integer positions.
        head_dim: even head width e.
        base: rotary base theta.

    Returns:
        ``(cos, sin)``, each (B, S, e // 2), float32.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def rotate_half_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama/Qwen rotary: rotate feature pairs ``(x_i, x_{i + e/2})``, in the dtype of ``x``.

    Args:
        x: (B, S, heads, e).
        cos, sin: (B, S, e // 2) float32 from :func:`rotary_angles`.
    """
    cos = torch.cat((cos, cos), dim=-1)[:, :, None].to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1)[:, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotate_interleaved_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Complex-number rotary: rotate adjacent pairs ``(x_{2i}, x_{2i+1})`` in float32.

    Args:
        x: (B, S, heads, e).
        cos, sin: (B, S, e // 2) float32 from :func:`rotary_angles`.

    Returns:
        (B, S, heads, e) in the dtype of ``x``.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    rotated = torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of past tokens, one slot per (loop, layer) of the looped model.

    A slot is named by any hashable key; the models use ``(loop, layer)`` for the looped
    layers (Ouro: ``L x T`` slots) and ``("prelude", i)`` / ``("coda", i)`` for Huginn's
    blocks outside the loop. Every slot holds the same positions.

    The layout follows Hugging Face's ``StaticCache``, so that a compiled decode step is
    one graph (and on CUDA one CUDA graph): every slot is a full-capacity buffer
    (B, G, capacity, e) at a fixed address, a call writes its ``n`` new tokens with
    ``index_copy_`` at the positions ``index + [0, n)`` held in a *tensor* (``index``,
    never read on the host inside a call), and attention reads the whole buffer under a
    mask that hides the unwritten positions. The host-side protocol of one forward call::

        cache.reserve(n)     # host: grow the buffers if n more tokens do not fit
        model call           # make_context -> start_call(valid); layers -> update(...)
        cache.advance(n)     # host: commit the n tokens (length and index move on)

    Storage starts with room for ``capacity`` tokens and doubles when it runs out (at
    most to ``max_length``), so the buffers keep one shape for many tokens (one compiled
    graph per capacity) and memory follows the tokens actually written rather than an
    upper bound such as ``max_new_tokens``.

    Args:
        batch: sequences B.
        capacity: tokens to reserve room for at first.
        max_length: tokens the cache will ever hold, if known: growth stops there
            (``None``: doubling without a cap).
    """

    def __init__(self, batch: int, capacity: int, *, max_length: int | None = None) -> None:
        self.batch = batch
        self.max_length = max_length
        self.capacity = max(1, capacity)
        self.length = 0  # host copy of ``index``, for growth and host-side bookkeeping
        self.index: Tensor | None = None  # (1,) int64: where the next call writes
        self.window: Tensor | None = None  # (n,) int64: the positions this call writes
        self.key_mask: Tensor | None = None  # (B, capacity) bool: real (not padded) keys
        self.padded = False  # some call passed an attention mask
        self._slots: dict[Hashable, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def slots(self) -> list[Hashable]:
        """Names of the slots written so far."""
        return list(self._slots)

    def reserve(self, n: int) -> None:
        """Host side, before a call of ``n`` new tokens: make room for them by doubling
        the capacity (copying every slot) until they fit, capped at ``max_length`` when
        that still fits. A compiled decode step sees new buffer shapes only here."""
        needed = self.length + n
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        if self.max_length is not None:
            capacity = max(needed, min(capacity, self.max_length))
        for name, (k, v) in self._slots.items():
            self._slots[name] = (_widen(k, capacity), _widen(v, capacity))
        if self.key_mask is not None:
            mask = self.key_mask.new_zeros(self.batch, capacity)
            mask[:, : self.capacity] = self.key_mask
            self.key_mask = _static(mask)
        self.capacity = capacity

    def start_call(self, valid: Tensor, *, explicit: bool) -> Tensor:
        """Record which of the call's ``n`` new tokens are real; return where they go.

        Args:
            valid: (B, n) bool.
            explicit: the mask came from the caller (padding possible); once one has,
                every later call builds explicit attention masks.

        Returns:
            (n,) int64, the cache positions ``index + [0, n)`` of the new tokens (also
            kept as :attr:`window` for :meth:`update`).
        """
        self.padded = self.padded or explicit
        if self.key_mask is None:  # the first call: allocate on the tokens' device
            self.key_mask = _static(
                torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=valid.device)
            )
            self.index = _static(torch.zeros(1, dtype=torch.int64, device=valid.device))
        self.window = self.index + torch.arange(valid.shape[1], device=valid.device)
        self.key_mask.index_copy_(1, self.window, valid)
        return self.window

    def update(self, name: Hashable, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens' keys/values into slot ``name``; return the whole slot.

        Args:
            name: the slot.
            k, v: (B, G, n, e) of the n new tokens.

        Returns:
            keys and values (B, G, capacity, e), the storage itself: positions past the
            new tokens hold zeros or stale values, which the context's masks hide.
        """
        if name not in self._slots:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self._slots[name] = (_static(k.new_zeros(shape)), _static(v.new_zeros(shape)))
        keys, values = self._slots[name]
        keys.index_copy_(2, self.window, k)
        values.index_copy_(2, self.window, v)
        return keys, values

    def copy_rows(self, dst: Hashable, src: Hashable, rows: Tensor, n: int) -> None:
        """Overwrite the newest ``n`` tokens of slot ``dst`` with ``src`` where ``rows``.

        Used when a token exits the loop early: the slots of the loops it skipped get
        the keys/values of its last computed loop (upstream Huginn's "latest" lookup).
        Host side (it slices at ``length``); not part of a compiled step.

        Args:
            dst, src: slot names; ``src`` must hold the newest tokens already.
            rows: (B,) bool, the sequences to overwrite.
            n: number of newest tokens (those of the current call, not yet advanced).
        """
        end = self.length + n
        src_k, src_v = self._slots[src]
        if dst not in self._slots:
            self._slots[dst] = (_static(src_k.clone()), _static(src_v.clone()))
            return
        dst_k, dst_v = self._slots[dst]
        pick = rows[:, None, None, None]
        window = slice(self.length, end)
        dst_k[:, :, window] = torch.where(pick, src_k[:, :, window], dst_k[:, :, window])
        dst_v[:, :, window] = torch.where(pick, src_v[:, :, window], dst_v[:, :, window])

    def advance(self, n: int) -> None:
        """Host side: commit the ``n`` tokens the last forward call wrote."""
        self.length += n
        if self.index is not None:
            self.index.add_(n)  # in place: the tensor keeps its (static) address

    def nbytes(self) -> int:
        """Bytes held by keys and values (preallocated capacity included)."""
        return sum(k.nbytes + v.nbytes for k, v in self._slots.values())


def _widen(t: Tensor, capacity: int) -> Tensor:
    """(B, G, K, e) -> (B, G, capacity, e): the old positions copied, zeros after, static."""
    out = t.new_zeros(*t.shape[:2], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return _static(out)


def _static(t: Tensor) -> Tensor:
    """Mark a cache buffer as living at a fixed address, so a compiled step under CUDA
    graphs (``mode="reduce-overhead"``) updates it in place instead of copying it."""
    torch._dynamo.mark_static_address(t)
    return t


# -------------------------------------------------------------------------- context


@dataclass
class Context:
    """What the attention layers of one forward call share (see the module docstring).

    Attributes:
        cos, sin: (B or 1, S, e // 2) float32 rotary angles of the S new positions.
        masks: per attention kind ("full_attention", "sliding_attention") a (B or 1, 1,
            S, K) bool mask (True = may attend), or ``None`` for plain causal attention
            without a cache (SDPA's fused causal path).
        valid: (B, S, 1) 0/1 in the state's dtype, 1 at real tokens; ``None`` when
            nothing is padded.
        cache: the KV cache, or ``None``.
        n_new: S, the number of new tokens.
    """

    cos: Tensor
    sin: Tensor
    masks: dict[str, Tensor | None]
    valid: Tensor | None
    cache: KVCache | None
    n_new: int

    def zero_padding(self, h: Tensor) -> Tensor:
        """Set the state of padded positions to zero: (B, S, d) -> (B, S, d)."""
        return h if self.valid is None else h * self.valid.to(h.dtype)


def make_context(
    seq_len: int,
    *,
    batch: int,
    head_dim: int,
    rope_base: float,
    device: torch.device,
    dtype: torch.dtype,
    attention_mask: Tensor | None = None,
    cache: KVCache | None = None,
    sliding_window: int | None = None,
) -> Context:
    """Positions, masks and rotary angles for ``seq_len`` new tokens.

    Args:
        seq_len: S, new tokens in this call.
        batch: B.
        head_dim: e.
        rope_base: rotary base.
        device, dtype: of the state.
        attention_mask: (B, S) for the new tokens (1 real, 0 padding); with a cache the
            earlier tokens' mask is the cache's. ``None``: every new token is real.
        cache: KV cache; the new tokens go at its ``index``, after the cached ones, and
            the masks span its whole capacity (K = capacity).
        sliding_window: w for the "sliding_attention" mask (query i sees keys j with
            i - w < j <= i), or ``None`` when no layer uses one.
    """
    if attention_mask is not None:
        new_valid = attention_mask.to(device=device, dtype=torch.bool)
    else:
        new_valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if cache is not None:
        # Positions come from the cache's index tensor, never from its host-side length,
        # and keys span its whole capacity: a compiled decode step keeps one graph.
        query_index = cache.start_call(new_valid, explicit=attention_mask is not None)
        key_valid = cache.key_mask
        padded = cache.padded
    else:
        query_index = torch.arange(seq_len, device=device)
        key_valid = new_valid
        padded = attention_mask is not None
    # The rotary position of a token is the number of real tokens before it.
    if padded:
        positions = (key_valid.long().cumsum(dim=1) - 1).clamp_min(0)[:, query_index]
    else:
        positions = query_index[None]
    cos, sin = rotary_angles(positions, head_dim, rope_base)

    query_index = query_index[:, None]
    key_index = torch.arange(key_valid.shape[1], device=device)[None, :]
    causal = key_index <= query_index  # (S, K); with a cache it hides unwritten positions
    full: Tensor | None = None  # None: SDPA's own causal mask (no cache, no padding)
    if padded:
        allowed = causal[None] & key_valid[:, None, :]
        full = (allowed | (key_index == query_index)[None])[
            :, None
        ]  # padded queries see themselves
    elif cache is not None:
        full = causal[None, None]
    masks: dict[str, Tensor | None] = {"full_attention": full}
    if sliding_window is not None:
        window = (causal & (key_index > query_index - sliding_window))[None, None]
        masks["sliding_attention"] = window if full is None else window & full
    valid = new_valid[..., None].to(dtype) if padded else None
    return Context(cos=cos, sin=sin, masks=masks, valid=valid, cache=cache, n_new=seq_len)


# ------------------------------------------------------------------------ attention


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout: float = 0.0) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads.

    Args:
        q: (B, H, S, e) queries.
        k, v: (B, G, K, e) keys and values, G dividing H; query head h reads key/value
            head ``h // (H / G)``.
        mask: (B or 1, 1, S, K) bool (True = may attend) or ``None`` for causal
            attention with S == K.
        dropout: attention-weight dropout probability.

    Returns:
        (B, H, S, e).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None
    )
