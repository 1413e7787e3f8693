"""jaxunlearn: machine unlearning of language models in JAX/Flax.

The core method is MOX (memorize to forget by model extrapolation): train a memorisation
model from the reference, then extrapolate through the reference to get the forget model.
"""

__version__ = "0.1.0"
