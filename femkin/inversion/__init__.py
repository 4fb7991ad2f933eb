"""Inversion: priors, the TAO fit, checkpoints and results."""
