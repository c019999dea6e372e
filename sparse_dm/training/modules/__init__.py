"""LightningModules: the diffusion objective and sampling shared by all models (diffusion.py), ChiroDiff,
Latent Diffusion and the first-stage autoencoder."""
