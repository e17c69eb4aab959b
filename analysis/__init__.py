"""Fit, query and plot the looped-LM scaling law L = E + A*(N_once + r^phi*N_rec)^-alpha + B*D^-beta.

Only numpy/scipy/pandas/pyarrow are imported here; plotting (matplotlib) and design queries
(models.accounting) load on first use.
"""

from .data import RunTable, load_epoch_chinchilla, load_runs
from .depth import depth_curves, fit_depth_curve
from .fit import fit_law, fit_probe
from .law import Estimate, ScalingLaw

__all__ = ["Estimate", "RunTable", "ScalingLaw", "depth_curves", "fit_depth_curve", "fit_law", "fit_probe",
           "load_epoch_chinchilla", "load_runs"]
