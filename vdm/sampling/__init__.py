"""Drawing sprites from a trained model: the samplers' steps, the walk, the sample stage's outputs."""
