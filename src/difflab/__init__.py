"""difflab: diffusion models with verified math."""
