"""The one frozen configuration of a Gyges server, built from the CLI flags.

Engine-agnostic: SGLang's hooks build it (see ``gyges.hooks.server_args``) and attach it
to ServerArgs, which carries it into every SGLang process. It is never mutated.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("gyges", "round_robin", "llf")
DEFAULT_GRANULE_BYTES = 2 * 1024 * 1024


class GygesConfigError(ValueError):
    """An invalid combination of server flags; the message is shown to the user."""


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class GygesConfig:
    """Validated Gyges settings for one host.

    Invariants (checked by :meth:`build`): ``max_tp`` is a power of two,
    ``max_tp <= dp_size``, ``max_tp <= num_kv_heads`` and ``dp_size % max_tp == 0``,
    so every aligned group of every degree up to ``max_tp`` exists and divides the
    KV heads evenly.
    """

    enabled: bool
    dp_size: int
    max_tp: int
    policy: str
    num_kv_heads: int
    granule_bytes: int = DEFAULT_GRANULE_BYTES
    split_hold_down_s: float = 5.0

    @property
    def degrees(self) -> tuple[int, ...]:
        """Every TP degree an instance can take: 1, 2, 4, ..., max_tp."""
        out, k = [], 1
        while k <= self.max_tp:
            out.append(k)
            k *= 2
        return tuple(out)

    @classmethod
    def build(
        cls,
        *,
        enabled: bool,
        tp_size: int,
        dp_size: int,
        max_tp: int | None,
        policy: str,
        num_kv_heads: int,
        granule_bytes: int = DEFAULT_GRANULE_BYTES,
        split_hold_down_s: float = 5.0,
    ) -> GygesConfig:
        """Validate the flags; raise :class:`GygesConfigError` with a user-facing message."""
        if not enabled:
            return cls(False, dp_size, 1, policy, num_kv_heads, granule_bytes, split_hold_down_s)
        if tp_size != 1:
            raise GygesConfigError(
                f"--enable-gyges requires --tp-size 1 (got {tp_size}): Gyges boots every "
                "replica as TP1 and forms larger TP groups at runtime"
            )
        if policy not in POLICIES:
            raise GygesConfigError(f"--gyges-policy must be one of {POLICIES}, got {policy!r}")
        if max_tp is None:
            max_tp = _largest_power_of_two_at_most(min(dp_size, num_kv_heads))
            while dp_size % max_tp:
                max_tp //= 2
        if not is_power_of_two(max_tp):
            raise GygesConfigError(f"--gyges-max-tp must be a power of two, got {max_tp}")
        if max_tp > dp_size:
            raise GygesConfigError(
                f"--gyges-max-tp {max_tp} is larger than --dp-size {dp_size}"
            )
        if max_tp > num_kv_heads:
            raise GygesConfigError(
                f"--gyges-max-tp {max_tp} is larger than the model's {num_kv_heads} KV heads "
                "(each rank of a TP group must own at least one KV head)"
            )
        if dp_size % max_tp:
            raise GygesConfigError(
                f"--dp-size {dp_size} must be a multiple of --gyges-max-tp {max_tp} "
                "(replicas merge only in aligned groups)"
            )
        if granule_bytes <= 0 or granule_bytes % 4096:
            raise GygesConfigError(
                f"--gyges-granule-bytes must be a positive multiple of 4096, got {granule_bytes}"
            )
        if split_hold_down_s < 0:
            raise GygesConfigError("--gyges-split-hold-down must be >= 0 seconds")
        return cls(True, dp_size, max_tp, policy, num_kv_heads, granule_bytes, split_hold_down_s)


def _largest_power_of_two_at_most(n: int) -> int:
    k = 1
    while k * 2 <= n:
        k *= 2
    return k
