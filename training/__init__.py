"""Training of VAEs and CVAEs: data, model, losses, checkpoints, the vae-train/vae-eval commands.

Kept light: importing the package imports no torch; import the submodules you need.
"""

__all__: list[str] = []
