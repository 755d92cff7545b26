"""Models: shared layers, the DINOv2 ViT encoder, the triplane LRM, FlexRM and the import of official weights."""

from vfusion3d_jax.models.flexrm import FlexRM, Gaussians
from vfusion3d_jax.models.lrm import LRM, abstract_lrm, count_parameters
from vfusion3d_jax.models.vit import VisionTransformer

__all__ = ["FlexRM", "Gaussians", "LRM", "VisionTransformer", "abstract_lrm", "count_parameters"]
