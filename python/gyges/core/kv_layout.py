"""Head-major KV layout: one `[H, S, D]` tensor per layer (K or V) that serves TP1 and any
merged degree k as a strided *view*, so a transformation only swaps contiguous `[S, D]` blocks.

Storage of one rank (H KV heads, S slots, head dim D), block b = storage[b] is `[S, D]`::

    storage [H, S, D]   block b = 0 .. H-1, each block S*D contiguous elements

At TP1 block b holds head b of this replica's own slots. At degree k the same memory is read
as `[H/k, k, S, D]`: block b = a*k + i holds head a*k + r (r = this rank's local rank) of the
slots that came from replica i of the aligned sub-group::

    b:      0        1     ...  k-1        k        k+1   ...
    (a,i): (0,0)    (0,1)  ... (0,k-1)    (1,0)    (1,1)  ...
    head:   r        r     ...  r          k+r      k+r   ...
    slots: repl. 0  repl. 1 ... repl. k-1  repl. 0  repl. 1 ...

Merged slot m = i*S + s, so for fixed a the k blocks (a, 0..k-1) form one run of k*S slots.
Ownership is interleaved (head h lives on local rank h % k), which nests: what a rank owns
at degree 2k is a subset of what it owned at degree k.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from gyges.core.degrees import check_degree, check_local_rank, is_power_of_two

__all__ = ["HeadMajorLayout", "check_degree", "check_local_rank", "gather_slots",
           "is_power_of_two"]


def gather_slots(view: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`view[slots]` for a head-major view (`tp1_view` or `merged_view`: `[S', H', D]` with
    strides `(D, S'*D, 1)`), gathered along the slot axis of the underlying contiguous
    `[H', S', D]` memory. Returns `[n, H', D]`, the transpose of a contiguous `[H', n, D]`:
    the same values as `view[slots]`, copied one `D`-row per (head, slot) instead of
    element-wise through the strides (about 2.7x faster on CPU), and already in the
    heads-first order attention wants."""
    storage = view.permute(1, 0, 2)
    if not storage.is_contiguous():
        raise ValueError(f"not a head-major view: shape {tuple(view.shape)}, "
                         f"strides {view.stride()}")
    return storage.index_select(1, slots).transpose(0, 1)


@dataclass(frozen=True)
class HeadMajorLayout:
    """Geometry of one rank's head-major KV buffer for one layer and one of K or V.

    Invariant: `allocate` returns a contiguous `[H, S, D]` tensor; every view below is a
    reinterpretation of exactly that memory (no copies), valid for any power-of-two k | H.
    """

    num_kv_heads: int
    slots_per_replica: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "slots_per_replica", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    # -- geometry --------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """`(H, S, D)` of the storage tensor."""
        return (self.num_kv_heads, self.slots_per_replica, self.head_dim)

    @property
    def numel(self) -> int:
        return self.num_kv_heads * self.slots_per_replica * self.head_dim

    def nbytes(self, elem_size: int) -> int:
        """Bytes of one storage tensor (one layer, K or V)."""
        return self.numel * elem_size

    def max_degree(self) -> int:
        """Largest power of two dividing H: the largest degree this layout supports."""
        return self.num_kv_heads & -self.num_kv_heads

    def check_degree(self, k: int) -> None:
        check_degree(k, self.num_kv_heads)

    # -- storage and views -----------------------------------------------------------------

    def allocate(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zero-filled contiguous `[H, S, D]` storage tensor."""
        return torch.zeros(self.shape, dtype=dtype, device=device)

    def check_storage(self, storage: torch.Tensor) -> None:
        """Raise ValueError unless `storage` is a contiguous `[H, S, D]` tensor."""
        if tuple(storage.shape) != self.shape:
            raise ValueError(f"storage shape {tuple(storage.shape)} != layout {self.shape}")
        if not storage.is_contiguous():
            raise ValueError("head-major storage must be contiguous")

    def tp1_view(self, storage: torch.Tensor) -> torch.Tensor:
        """`[S, H, D]` with strides `(D, S*D, 1)`: token-major indexing of head-major memory."""
        self.check_storage(storage)
        return storage.permute(1, 0, 2)

    def merged_view(self, storage: torch.Tensor, k: int) -> torch.Tensor:
        """`[k*S, H/k, D]` with strides `(D, k*S*D, 1)`; element `[i*S + s, a]` is head
        `a*k + r` of replica i's slot s (r = the local rank owning this storage). k=1 gives
        `tp1_view`."""
        self.check_storage(storage)
        self.check_degree(k)
        h, s, d = self.shape
        # [H, S, D] -> [H/k, k*S, D] merges (i, s) into m = i*S + s; then heads second.
        return storage.view(h // k, k * s, d).permute(1, 0, 2)

    # -- ownership and block addressing ----------------------------------------------------

    def owned_heads(self, k: int, local_rank: int) -> list[int]:
        """KV heads owned by `local_rank` at degree k: h with h % k == local_rank, ascending.
        Local head index a of the merged view is global head `owned_heads(k, r)[a] = a*k + r`."""
        self.check_degree(k)
        check_local_rank(local_rank, k)
        return list(range(local_rank, self.num_kv_heads, k))

    def block_of(self, head: int, replica_offset: int, k: int) -> int:
        """Block index (first storage dim) holding `head` of replica `replica_offset` (its
        position inside the degree-k sub-group) on the rank that owns `head` at degree k."""
        self.check_degree(k)
        check_local_rank(replica_offset, k)
        if not 0 <= head < self.num_kv_heads:
            raise ValueError(f"head {head} out of range [0, {self.num_kv_heads})")
        return (head // k) * k + replica_offset

    def head_of_block(self, block: int, k: int, local_rank: int) -> int:
        """Inverse of `block_of` on rank `local_rank`: the global head stored in `block`."""
        self.check_degree(k)
        check_local_rank(local_rank, k)
        self._check_block(block)
        return (block // k) * k + local_rank

    def replica_of_block(self, block: int, k: int) -> int:
        """Replica offset i (inside the degree-k sub-group) whose slots `block` holds."""
        self.check_degree(k)
        self._check_block(block)
        return block % k

    def merged_slot(self, replica_offset: int, slot: int, k: int) -> int:
        """Merged slot id `i*S + s` of slot s of replica i (both inside the sub-group)."""
        check_local_rank(replica_offset, k)
        self._check_slot(slot)
        return replica_offset * self.slots_per_replica + slot

    def split_slot(self, merged_slot: int, k: int) -> tuple[int, int]:
        """Inverse of `merged_slot`: `(replica_offset, slot)`."""
        if not 0 <= merged_slot < k * self.slots_per_replica:
            raise ValueError(f"merged slot {merged_slot} out of range for degree {k}")
        return divmod(merged_slot, self.slots_per_replica)

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_kv_heads:
            raise ValueError(f"block {block} out of range [0, {self.num_kv_heads})")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots_per_replica:
            raise ValueError(f"slot {slot} out of range [0, {self.slots_per_replica})")
