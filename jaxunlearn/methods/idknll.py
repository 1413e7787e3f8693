"""IdkNLL: fine-tune on "I don't know" answers to the forget questions, with the retain set (TOFU's "idk")."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class IdkNLLParams:
    nll_reduction: str = "token"


gradient_method("idknll", IdkNLLParams, loss="NLL(F questions → IDK answers ∪ R)",
                source="Maini et al. 2024 (TOFU idk); open-unlearning idk experiment", data=("target", "retain"))
