"""The launcher of hydra/launcher=slurm. Hydra instantiates only launchers defined under `hydra_plugins`; what it
does is in outlierlab.launcher.SlurmLauncher."""
from outlierlab.launcher import SlurmLauncher as _SizedSlurmLauncher


class SlurmLauncher(_SizedSlurmLauncher):
    pass
