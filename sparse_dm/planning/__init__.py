"""What a run will cost before it starts: parameters and FLOPs (also per timestep band), memory, disk and
run length. Nothing here trains or touches data."""
