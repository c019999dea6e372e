"""Lightning adapters: the shared diffusion LightningModule, model-family modules, DST callback."""
