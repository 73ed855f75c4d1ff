"""Engine-agnostic core of sglang-gyges: KV layout math, transfer plans, padded MLP weights
and owned-head attention shards. Imports only torch, numpy and the standard library."""
