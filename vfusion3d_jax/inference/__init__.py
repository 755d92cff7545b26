"""Image to 3D: preprocessing, reconstruction, the infer and evaluate commands."""
