"""Pure nn.Module denoisers and autoencoders (no Lightning)."""
