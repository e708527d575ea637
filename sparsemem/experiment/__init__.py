"""`sparsemem run`: one experiment end to end (train, evaluate, export, analyse, report) in a run directory."""
