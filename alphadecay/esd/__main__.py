"""python -m alphadecay.esd PATH: the per-module spectral report (alphadecay/esd/report.py)."""

from alphadecay.esd.report import main

raise SystemExit(main())
