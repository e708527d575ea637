"""KOFF core: hard-concrete gates, sparsity accounting + Lagrangian, the per-domain memory table,
row-sparse Adam, deterministic masks and compaction. Model-agnostic through `sparsemem.models.hooks`."""
