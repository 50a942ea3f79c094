"""The diffusers family: UNet2DModel and DiT pipelines, run by the diffusers library."""
