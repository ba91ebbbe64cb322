"""Synthetic defects: Perlin masks and textures, a DDPM that paints defects, the banks it
writes, and the training and validation sets that carry them."""
