"""Which serving paths ``--enable-gyges`` accepts at startup, and the one-line refusals.

Engine-agnostic: :mod:`gyges.hooks.server_args` reads SGLang's parsed flags into
:class:`ServingPath` and exits 2 with :func:`refusal`'s line when it is not None.

Verified here (CPU, see ``docs/layout.md``): the ``torch_native`` attention backend, and
``triton`` through Triton's interpreter (``TRITON_INTERPRET=1``). Every other backend reads
the KV pool in ways not checked against the head-major layout. On CUDA nothing is built
yet: CUDA graphs are captured for one TP degree, and the communicator pool has only gloo
groups, so KV and weights would move through host memory. Those are refused, loudly,
rather than left to fail at the first merge.
"""
from __future__ import annotations

from dataclasses import dataclass

VERIFIED_BACKENDS = ("torch_native", "triton")
# The backend an unset --attention-backend resolves to under --enable-gyges.
DEFAULT_BACKEND = {"cpu": "torch_native", "cuda": "triton"}
DROP = "or drop --enable-gyges"


@dataclass(frozen=True)
class ServingPath:
    """The flags that decide how a Gyges server computes attention and moves state.

    ``device``: the resolved device ("cpu", "cuda", ...). ``backends``: flag name to its
    value (None: unset), for ``--attention-backend`` and the prefill/decode overrides.
    ``cuda_graph``: True unless ``--disable-cuda-graph``.
    """

    device: str
    backends: dict[str, str | None]
    cuda_graph: bool


def resolve_device(flag: str | None, cuda_available: bool) -> str:
    """SGLang's rule: an unset ``--device`` is CUDA when CUDA is present, else CPU."""
    if flag:
        return flag
    return "cuda" if cuda_available else "cpu"


def refusal(path: ServingPath) -> str | None:
    """The first reason this serving path is refused (one line), or None."""
    if path.device not in DEFAULT_BACKEND:
        return (f"--enable-gyges supports --device cpu (verified) and cuda (refused until "
                f"built), not {path.device!r}; {DROP}")
    for flag, backend in path.backends.items():
        if backend is not None and backend not in VERIFIED_BACKENDS:
            return (f"--enable-gyges: {flag} {backend} is not verified with the head-major KV "
                    f"pool; use one of {', '.join(VERIFIED_BACKENDS)}, {DROP}")
    if path.device == "cuda":
        if path.cuda_graph:
            return ("--enable-gyges on CUDA needs --disable-cuda-graph: CUDA graphs are "
                    f"captured for one TP degree and not re-captured per degree yet; {DROP}")
        return ("--enable-gyges on CUDA is not built yet: the communicator pool has only "
                "gloo groups (KV and weights would move through host memory), NCCL device "
                f"groups are not built; run with --device cpu, {DROP}")
    return None
