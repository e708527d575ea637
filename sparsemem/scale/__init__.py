"""Scale-out: TPU topologies, ahead-of-time compilation of the KOFF steps, multi-host runs."""
