"""Pallas kernels for jax_eplb (installed as ``jax_eplb_kernels``)."""
