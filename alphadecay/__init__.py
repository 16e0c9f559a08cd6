"""alphadecay: LLaMA pretraining on C4 whose subject is weight decay (Uniform, AWD, AdaDecay, AlphaDecay)."""
