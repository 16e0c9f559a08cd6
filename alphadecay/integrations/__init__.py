"""alphadecay.wd inside other people's training loops: one callback per framework, each a thin shell around
`alphadecay.wd.create(...).step()`, called once per optimizer update.

- `alphadecay.integrations.hf.WeightDecayCallback(name, **options)`: the Hugging Face Trainer
  (`pip install 'alphadecay[hf]'`); `module_groups_optimizer(...)` builds the per-module groups for
  `Trainer(optimizer_cls_and_kwargs=...)`.
- `alphadecay.integrations.lightning.WeightDecayCallback(name, **options)`: PyTorch Lightning
  (`pip install 'alphadecay[lightning]'`).

Each module imports its framework when it is imported; this package imports neither.
"""
