"""The paper's second system: a ViT (DeiT-tiny) on an ImageFolder dataset, without timm or torchvision.

model.py (the ViT and its registry), transforms.py (training/eval pipelines, random erasing, seeding),
augment.py (RandAugment), mixup.py (Mixup/CutMix and the soft-target losses), data.py (ImageFolder, the
distributed training order, evaluation shards, top-k counts) and ema.py (model EMA). timm and torchvision are not
dependencies: on a CPU torch their CUDA wheels break `import torchvision` (shared notes, vit.md), so the parts of
them the official ViT code uses are rewritten here from timm 0.4.5, the official pin.
"""
