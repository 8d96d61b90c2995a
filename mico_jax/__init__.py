"""mico_jax: membership-inference research at MICO scale, in JAX.

A stack of K models is one pytree with a leading models axis; every attack is a
pure function of stacked statistics `stat_KxNxA` and the membership matrix
`keep_KxN`. See README.md for the tour.
"""
