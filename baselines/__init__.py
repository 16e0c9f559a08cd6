"""The paper's baselines behind the weight-decay scheduler interface: Uniform, AWD, AdaDecay."""
