"""alphadecay.wd: weight-decay methods as a library."""
