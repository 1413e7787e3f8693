"""Plain fine-tuning: what `jaxunlearn finetune` trains (a reference or retain model on one split).

Not an unlearning method (`unlearn` refuses it); registered so that a fine-tuning run directory
records its method like every other run. Its result is RUN/reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import Method, register


@dataclass(frozen=True)
class FinetuneParams:
    pass


register(Method(
    name="finetune",
    params=FinetuneParams,
    objective=lambda p: ("finetune", {}),
    data=lambda p: ("train",),
    result="trained",
    loss="token-mean NLL of the split",
    source="TOFU reference fine-tuning (Maini et al. 2024)",
    stage_dir="finetune",
))
