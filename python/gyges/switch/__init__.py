"""The SGLang side of a runtime TP switch: pooled groups as SGLang GroupCoordinators,
model resharding, KV pool re-views, scheduler state, and the merge/split commands."""
