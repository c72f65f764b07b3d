"""The Variational Diffusion Model: its network, noise schedules, loss, bound and the files it
is saved in."""
