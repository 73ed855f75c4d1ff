"""sglang-gyges: dynamic DP <-> TP transformation for SGLang (Gyges, arXiv 2509.19729)."""

__version__ = "0.1.0"
