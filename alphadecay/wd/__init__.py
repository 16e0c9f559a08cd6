"""alphadecay.wd: weight-decay methods as a library, for any training loop and any model.

    import torch, alphadecay.wd as wd

    optimizer = torch.optim.AdamW(wd.module_param_groups(model, weight_decay=0.1), lr=1e-3)
    scheduler = wd.create("alphadecay", model, optimizer)      # wd.available(): every method
    for batch in data:
        model(**batch).loss.backward()
        metrics = scheduler.step()                             # after backward (and clipping), before the step
        optimizer.step(); optimizer.zero_grad()

Names: `module_param_groups` (alphadecay/wd/groups.py), `create`, `Scheduler`, `WDUpdate` (scheduler.py),
`available`, `METHODS`, `OPTIONS`, `WeightDecayError` (registry.py). The registry imports no torch, so this
package's names load on first use: the training configs read the registry without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "module_param_groups": "alphadecay.wd.groups", "weight_modules": "alphadecay.wd.groups",
    "create": "alphadecay.wd.scheduler", "Scheduler": "alphadecay.wd.scheduler", "WDUpdate": "alphadecay.wd.scheduler",
    "available": "alphadecay.wd.registry", "METHODS": "alphadecay.wd.registry", "OPTIONS": "alphadecay.wd.registry",
    "WeightDecayError": "alphadecay.wd.registry",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'alphadecay.wd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
