"""EDM (Karras et al. 2022) for Neon: networks, safe checkpoint loading, the Heun sampler, the training losses and
augmentation, and the adapter the Neon core uses (`edm.adapter.EDMFamily`)."""
