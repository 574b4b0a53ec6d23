"""Model-free core of the .sdl format: container, header, quantizers, entropy coding.

Nothing in this package imports torch: every function here is deterministic and
bit-exact, so the latent layer of a file decodes to the same array on every
platform (the test vectors in ``spec/`` prove it).
"""
