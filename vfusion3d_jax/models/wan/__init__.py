"""The Wan video diffusion transformer (Wan 2.1 / 2.2, diffusers' `WanTransformer3DModel`) and its weight import."""

from vfusion3d_jax.models.wan.transformer import WanTransformer, abstract_wan_transformer, count_parameters

__all__ = ["WanTransformer", "abstract_wan_transformer", "count_parameters"]
