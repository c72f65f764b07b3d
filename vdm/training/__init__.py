"""The train stage's work: the loop, one optimisation step, tracking, profiling."""
