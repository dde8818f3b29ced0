"""ShapesWorld: a toy text-to-image world where erasure is measured end to end on a CPU."""
