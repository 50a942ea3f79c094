"""xAR (next-cell flow matching, OliverRensu/xAR) with the MAR KL-16 VAE, as a Neon family (see adapter.py)."""
