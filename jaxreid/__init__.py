"""jaxreid: unsupervised domain-adaptive person re-identification (MMT, ABMT) in JAX/Flax."""

__version__ = '0.1.0'
