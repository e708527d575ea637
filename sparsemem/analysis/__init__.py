"""Neuron specialisation: language-specific neurons (LAPE) and whether the KOFF mask removes them."""
