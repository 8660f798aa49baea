"""Model code: Llama attention, Mamba-1 / Mamba-2 mixers, the hybrid decoder and its caches."""
