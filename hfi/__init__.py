"""Human feedback inversion: labels -> reward model -> a learned token that stands for a concept."""
