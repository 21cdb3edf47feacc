"""What users take away from an encoder: embeddings of Sentinel-2 images (`embed`) and change maps
(`change_map`)."""
