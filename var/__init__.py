"""VAR (Visual AutoRegressive modeling, Tian et al. 2024) for Neon: the multi-scale VQVAE (vqvae.py, quant.py),
the next-scale transformer (model.py), its sampler (sampler.py) and loss (loss.py), checkpoint files
(checkpoint.py) and the adapter the Neon core talks to (adapter.py: `VARFamily`)."""
