"""Fit, query and plot the looped-LM scaling law L = E + A*(N_once + r^phi*N_rec)^-alpha + B*D^-beta.

Imported here: numpy/scipy/pandas/pyarrow and the torch-free model accounting (models.config, models.accounting,
~20 ms) that design queries answer with; plotting (matplotlib) loads on first use.
"""

from .compare import Comparison, compare
from .data import RunTable, load_epoch_chinchilla, load_runs
from .depth import depth_curves, fit_depth_curve
from .fit import fit_law, fit_probe
from .law import Estimate, ScalingLaw
from .optimal import Design, OptimalDesign

__all__ = ["Comparison", "Design", "Estimate", "OptimalDesign", "RunTable", "ScalingLaw", "compare", "depth_curves",
           "fit_depth_curve", "fit_law", "fit_probe", "load_epoch_chinchilla", "load_runs"]
