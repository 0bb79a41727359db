"""Transport: the linear interpolant, training loss, timestep shift and samplers."""
