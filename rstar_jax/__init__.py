"""rstar_jax: rStar-Math in JAX."""
