"""The spectral tools: the empirical spectral density of weight matrices and its heavy-tail metrics
(`spectral.py`, the math AlphaDecay's passes use), and the per-module report `python -m alphadecay.esd PATH`
(`report.py`)."""

from alphadecay.esd.spectral import (  # noqa: F401  (the package's names)
    EIGS_THRESH, ENTROPY_EPS, ESD_ESTIMATORS, EVALS_THRESH, FIT_METHODS, FP32_MAX_SPREAD, METRIC_KEYS, SMALL_EIGENVALUE_FITS,
    FarmsSampling, alphahat, assign_owners, eigenvalues, farms_eigenvalues, farms_submatrices, farms_windows,
    fit_power_law, fitted_xmin, module_metrics, reference_farms_eigenvalues, reference_fit_power_law,
    reference_module_metrics, spectral_metrics,
)
