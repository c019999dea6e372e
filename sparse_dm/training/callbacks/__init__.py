"""Lightning callbacks: the DST mask updates, in-training FID, the non-finite guard and RNG state."""
