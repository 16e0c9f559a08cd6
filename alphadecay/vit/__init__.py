"""The paper's second system: a ViT (DeiT-tiny) on an ImageFolder dataset, without timm or torchvision.

config.py (every flag of the official ViT main.py, `vit_main.py`'s configuration), run.py (checks and assembly),
train.py (the training loop), model.py (the ViT and its registry), transforms.py (training/eval pipelines, random
erasing, seeding), augment.py (RandAugment), mixup.py (Mixup/CutMix and the soft-target losses), data.py
(ImageFolder, the distributed training order, evaluation shards, top-k counts) and ema.py (model EMA). The
weight-decay methods are the LLaMA side's (alphadecay/wd/registry.py, with the ViT family's semantics). timm and
torchvision are not dependencies: on a CPU torch their CUDA wheels break `import torchvision` (shared notes,
vit.md), so the parts of them the official ViT code uses are rewritten here from timm 0.4.5, the official pin.
"""
