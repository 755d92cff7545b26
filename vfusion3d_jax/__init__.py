"""VFusion3D / FlexiView3D in JAX and Flax NNX."""

__version__ = "0.1.0"
