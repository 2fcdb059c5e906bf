"""CLIP-guided diffusion: guidance as a wrapper around a diffusers denoiser, and the training recipe
of the bundled Shapes diffusion model."""
