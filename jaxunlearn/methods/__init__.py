"""Unlearning methods: one module each (hyper-parameters with published defaults, objective, data,
what follows training), selected with `method=NAME`. See registry.py for the contract."""

from jaxunlearn.methods import (  # noqa: F401  (modules register themselves)
    dpo,
    finetune,
    ga,
    graddiff,
    idknll,
    kl,
    mox,
    npo,
    rmu,
    simnpo,
    task_vector,
    undial,
)
from jaxunlearn.methods.registry import METHODS, Method, UnknownMethodError, get_method, register

__all__ = ["METHODS", "Method", "UnknownMethodError", "get_method", "register"]
