"""Framework-neutral model math shared by the torch and flax networks (array-API only)."""

from diffusion_core.models.embeddings import timestep_embedding

__all__ = ["timestep_embedding"]
