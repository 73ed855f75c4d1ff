"""The communicator pool: one cross-replica world and every aligned subgroup, built once
at startup so that a transformation never creates communicators (DESIGN section 3)."""
