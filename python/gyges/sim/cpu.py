"""The cores of one simulated CPU host (a calibration of a CPU server; never on GPUs).

On a CPU host every busy scheduler process runs its steps on the host's cores: when more
processes are busy than there are cores, each step takes longer. The calibration timed
an instance of ``k`` schedulers alone, so its steps already include ``max(c, k) / c``;
with ``B`` busy processes on the host a step takes ``max(c, B) / max(c, k)`` times its
calibrated time (:meth:`HostCpu.scale`). Busy processes: the ranks of every instance
that is prefilling or decoding (one paused for a transformation stays counted: its
processes move the KV), plus ``extra`` always-busy ones (stock SGLang's DP controller
busy-polls its socket). A change of the busy count re-times every instance's
decode from its next step boundary (:meth:`Instance.retime`), so a segment never keeps a
factor the host no longer has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gyges.sim.instance import Instance

# processes stock SGLang's DP controller keeps busy (its event loop polls without
# blocking); Gyges' controller blocks on its socket instead
STOCK_DP_CONTROLLER_PROCS = 1


class HostCpu:
    """``cores``: what the host's processes share; ``extra``: processes always busy."""

    def __init__(self, cores: float, extra: int = 0) -> None:
        if cores <= 0:
            raise ValueError("a CPU host needs cores > 0")
        self.cores, self.busy = float(cores), extra
        self.instances: list[Instance] = []

    def scale(self, k: int) -> float:
        """Step-time factor now for an instance of ``k`` ranks."""
        c = self.cores
        return max(c, float(self.busy)) / max(c, float(k))

    def add(self, inst: Instance) -> None:
        self.instances.append(inst)

    def remove(self, inst: Instance) -> None:
        """Forget an instance replaced by a transformation (it holds no busy ranks)."""
        self.instances.remove(inst)

    def changed(self, delta: int) -> None:
        self.busy += delta
        for inst in list(self.instances):
            inst.retime()
