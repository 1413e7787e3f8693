"""Baseline objectives on the tiny Llama against direct torch reimplementations of the reference formulas.

Each reference below is written from full float64 logits (or hidden states) following open-unlearning's
src/trainer/unlearn/*.py and src/trainer/utils.py (TOFU's dataloader.py for IdkNLL); it never calls
jaxunlearn.objectives. Where our objective deliberately differs (retain KL and UNDIAL positions, see
objectives/terms.py and undial.py), the reference applies open-unlearning's formula to our positions
and the comment says so. Values must agree within 1e-6 (relative, or absolute near zero).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxunlearn.config import load_config
from jaxunlearn.methods import get_method
from jaxunlearn.models import ModelConfig, init_model, make_apply, split_params
from jaxunlearn.objectives import OBJECTIVES, get_objective
from jaxunlearn.objectives.common import MissingBatchKeyError
from jaxunlearn.ops import IGNORE

B, T, PROMPT = 3, 12, 4
TOL = dict(rtol=1e-6, atol=1e-6)


def make_batch(rng, vocab, lengths, prompt_ids=None):
    """Right-padded batch: the first PROMPT tokens are the prompt (unscored), the rest the answer."""
    ids = rng.integers(3, vocab, (B, T)).astype(np.int32)
    if prompt_ids is not None:
        ids[:, :PROMPT] = prompt_ids
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    labels = np.where(mask == 1, ids, IGNORE)
    labels[:, :PROMPT] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}


@pytest.fixture(scope="module")
def world():
    cfg = ModelConfig.preset("tiny-llama")
    graphdef, ref = split_params(init_model(cfg, seed=0))
    rng = np.random.default_rng(1)
    # the trained model starts a little away from the reference, so that KL and log-ratios are not zero
    params = jax.tree.map(lambda x: x + jnp.asarray(0.03 * rng.standard_normal(x.shape), x.dtype), ref)
    forget = make_batch(rng, cfg.vocab_size, [12, 10, 7])
    batch = {
        "forget": forget,
        "retain": make_batch(rng, cfg.vocab_size, [12, 9, 11]),
        "target": make_batch(rng, cfg.vocab_size, [9, 12, 8], prompt_ids=forget["input_ids"][:, :PROMPT]),
    }
    apply = make_apply(graphdef)
    return {"cfg": cfg, "params": params, "ref": ref, "batch": batch, "apply": apply, "logits": jax.jit(apply)}


# ------------------------------------------------------------ direct reference formulas (torch, float64)


def full_logits(world, params, b):
    return torch.from_numpy(np.asarray(world["logits"](params, b["input_ids"], b["attention_mask"]), np.float64))


def hf_loss(logits, b):
    """HF causal-LM `outputs.loss`: token-mean cross-entropy of the shifted labels."""
    labels = torch.from_numpy(b["labels"]).long()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def batch_nll(logits, b):
    """open-unlearning utils.compute_batch_nll: summed NLL per sequence [B]."""
    labels = torch.from_numpy(b["labels"]).long()
    return F.cross_entropy(logits[:, :-1].transpose(-1, -2), labels[:, 1:], ignore_index=-100, reduction="none").sum(-1)


def n_answer(b):
    return torch.from_numpy((b["labels"] != IGNORE).sum(-1)).double()


def sample_nll(logits, b):
    """Mean over samples of each sample's per-token NLL (nll_reduction="sample")."""
    return (batch_nll(logits, b) / n_answer(b)).mean()


def kl_on_our_positions(cur, ref, b):
    """open-unlearning utils.compute_kl_divergence (kl_div, log_target, batchmean over rows) applied
    to the rows t < T-1 whose next token is real, instead of all B*T rows (see objectives/terms.py)."""
    keep = torch.from_numpy(b["attention_mask"][:, 1:] == 1)
    rows_cur, rows_ref = cur[:, :-1][keep], ref[:, :-1][keep]
    return F.kl_div(F.log_softmax(rows_cur, -1), F.log_softmax(rows_ref, -1), reduction="batchmean", log_target=True)


def dpo_loss(world, win, lose, beta):
    """open-unlearning utils.compute_dpo_loss; win=None is NPO."""
    p, r = world["params"], world["ref"]
    lose_ratio = -(batch_nll(full_logits(world, p, lose), lose) - batch_nll(full_logits(world, r, lose), lose))
    win_ratio = 0.0
    if win is not None:
        win_ratio = -(batch_nll(full_logits(world, p, win), win) - batch_nll(full_logits(world, r, win), win))
    return -2 / beta * F.logsigmoid(beta * (win_ratio - lose_ratio)).mean()


def retain_nll(world):
    return hf_loss(full_logits(world, world["params"], world["batch"]["retain"]), world["batch"]["retain"])


def retain_kl(world):
    b = world["batch"]["retain"]
    return kl_on_our_positions(full_logits(world, world["params"], b), full_logits(world, world["ref"], b), b)


def forget_nll(world):
    return hf_loss(full_logits(world, world["params"], world["batch"]["forget"]), world["batch"]["forget"])


def simnpo_loss(world, beta, delta):
    """open-unlearning simnpo.py forget loss."""
    b = world["batch"]["forget"]
    x = batch_nll(full_logits(world, world["params"], b), b) / n_answer(b) - delta
    return -F.logsigmoid(beta * x).mean() * 2 / beta


def undial_loss(world, beta):
    """open-unlearning utils.compute_undial_loss, lowering the logit only where the label is scored
    (open-unlearning indexes with -100 elsewhere) and averaging over positions whose next token is real."""
    b = world["batch"]["forget"]
    student = full_logits(world, world["params"], b)[:, :-1]
    teacher = full_logits(world, world["ref"], b)[:, :-1]
    labels = torch.from_numpy(b["labels"][:, 1:]).long()
    lowered = torch.zeros_like(teacher)
    bi, ti = torch.nonzero(labels != -100, as_tuple=True)
    lowered[bi, ti, labels[bi, ti]] = 1.0
    soft = F.softmax(teacher - lowered * beta, dim=-1)
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), soft.reshape(-1, soft.shape[-1]), reduction="none")
    keep = torch.from_numpy(b["attention_mask"][:, 1:] == 1).reshape(-1)
    return ce[keep].mean()


def layer_acts(world, params, b, layer):
    h = world["apply"].hidden(params, b["input_ids"], b["attention_mask"], num_layers=layer + 1)
    return torch.from_numpy(np.asarray(h, np.float64))


def activation_loss(a1, a2, b):
    """open-unlearning rmu.py compute_activation_loss."""
    mask = torch.from_numpy(b["labels"] != -100).double()
    sq = F.mse_loss(a1, a2.expand_as(a1), reduction="none")
    return ((sq * mask.unsqueeze(-1)).mean(dim=2).sum(dim=1) / mask.sum(-1)).mean()


def rmu_terms(world, layer, coeff):
    """(forget, retain) activation losses of open-unlearning rmu.py (retain_loss_type EMBED_DIFF)."""
    f, r = world["batch"]["forget"], world["batch"]["retain"]
    u = torch.from_numpy(np.asarray(jax.random.uniform(jax.random.key(0), (world["cfg"].hidden_size,)), np.float64))
    control = (u / torch.norm(u) * coeff).view(1, 1, -1)
    forget = activation_loss(layer_acts(world, world["params"], f, layer), control, f)
    retain = activation_loss(layer_acts(world, world["params"], r, layer), layer_acts(world, world["ref"], r, layer), r)
    return forget, retain


def idk_loss(world):
    """TOFU dataloader.py "idk": HF loss of the target and retain batches concatenated."""
    t, r = world["batch"]["target"], world["batch"]["retain"]
    both = {k: np.concatenate([t[k], r[k]]) for k in t}
    return hf_loss(full_logits(world, world["params"], both), both)


# case: (hparams, reference formula, (metric, +1 or -1) that a descent step must raise or lower, or None,
#        {metric: reference} for terms too small to be checked through the total)
CASES = {
    "ga": ({}, lambda w: -forget_nll(w), ("forget_nll", +1)),
    "ga_sample": ({"nll_reduction": "sample"},
                  lambda w: -sample_nll(full_logits(w, w["params"], w["batch"]["forget"]), w["batch"]["forget"]), None),
    "graddiff": ({"gamma": 0.7, "alpha": 2.0}, lambda w: -0.7 * forget_nll(w) + 2.0 * retain_nll(w), None),
    "kl": ({}, lambda w: -forget_nll(w) + retain_kl(w), None, {"retain_kl": retain_kl}),
    "npo": ({"alpha": 0.0}, lambda w: dpo_loss(w, None, w["batch"]["forget"], 0.1), ("forget_log_ratio", -1)),
    # delta near the forget NLL (about 5.5 here) keeps log sigmoid away from 0, so the comparison means something
    "simnpo": ({"delta": 5.5, "alpha": 0.0}, lambda w: 0.125 * simnpo_loss(w, 4.5, 5.5), ("forget_nll", +1)),
    "dpo": ({"alpha": 0.0}, lambda w: dpo_loss(w, w["batch"]["target"], w["batch"]["forget"], 0.1), ("dpo_margin", +1)),
    "idknll": ({}, idk_loss, ("target_nll", -1)),
    "undial": ({}, lambda w: undial_loss(w, 10.0), None),
    "rmu": ({"layer": 0, "steering_coeff": 6.5, "alpha": 3.0},
            lambda w: rmu_terms(w, 0, 6.5)[0] + 3.0 * rmu_terms(w, 0, 6.5)[1], None,
            {"retain_embed_diff": lambda w: rmu_terms(w, 0, 6.5)[1]}),
}


def objective_name(case):
    return case.split("_")[0]


def value_and_grad(world, name, **hparams):
    obj = get_objective(name, **hparams)
    return jax.jit(jax.value_and_grad(lambda p, r, b: obj(p, r, b, world["apply"]), has_aux=True))


def step(params, grads, size=1e-2):
    """params moved by `size` against the gradient direction (unit global norm)."""
    norm = jnp.sqrt(sum((g.astype(jnp.float32) ** 2).sum() for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda p, g: p - size * g / norm, params, grads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_formula_and_gradient_descends(world, case):
    """Loss = reference formula; gradients finite; a small descent step lowers the loss and moves the
    forget term the way the method intends (the retain terms are checked by graddiff, kl and
    test_mox_spec_alpha_is_not_the_retain_weight, which is npo with its default retain NLL)."""
    hparams, reference, direction, *terms = CASES[case]
    fn = value_and_grad(world, objective_name(case), **hparams)
    (loss, metrics), grads = fn(world["params"], world["ref"], world["batch"])
    np.testing.assert_allclose(float(loss), float(reference(world)), **TOL)
    for metric, term in (terms[0] if terms else {}).items():
        np.testing.assert_allclose(float(metrics[metric]), float(term(world)), rtol=1e-6)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
    (stepped, after), _ = fn(step(world["params"], grads), world["ref"], world["batch"])
    assert float(stepped) < float(loss)
    if direction is not None:
        metric, sign = direction
        assert sign * (float(after[metric]) - float(metrics[metric])) > 0


def test_undial_lowers_forget_likelihood_and_reference_is_frozen(world):
    """Distilling toward the lowered teacher from the reference itself makes the forget answers less likely."""
    obj = get_objective("undial")
    fn = jax.jit(jax.grad(lambda p, r: obj(p, r, world["batch"], world["apply"])[0], argnums=(0, 1)))
    g_params, g_ref = fn(world["ref"], world["ref"])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_ref))
    before = float(hf_loss(full_logits(world, world["ref"], world["batch"]["forget"]), world["batch"]["forget"]))
    moved = step(world["ref"], g_params)
    after = float(hf_loss(full_logits(world, moved, world["batch"]["forget"]), world["batch"]["forget"]))
    assert after > before


def test_rmu_trainable_stops_other_gradients_and_steers(world):
    fn = value_and_grad(world, "rmu", layer=1, alpha=0.0, trainable=r"layers\.1\.mlp\.down_proj\.kernel")
    (_, before), grads = fn(world["params"], world["ref"], world["batch"])
    (_, after), _ = fn(step(world["params"], grads), world["ref"], world["batch"])
    assert float(after["forget_rmu"]) < float(before["forget_rmu"])
    moved = {jax.tree_util.keystr(path): g for path, g in jax.tree_util.tree_leaves_with_path(grads)
             if float(jnp.abs(g).max()) > 0}
    # decoder layers are stacked ([layers, ...] leaves): only slice 1 of the down-projection may move
    assert list(moved) == ["['layers']['mlp']['down_proj']['kernel'].value"]
    per_layer = jnp.abs(next(iter(moved.values()))).reshape(world["cfg"].num_layers, -1).max(-1)
    assert float(per_layer[1]) > 0 and all(float(v) == 0 for i, v in enumerate(per_layer) if i != 1)
    with pytest.raises(ValueError, match="trainable 'nothing' matches no parameter"):
        value_and_grad(world, "rmu", layer=1, trainable="nothing")(world["params"], world["ref"], world["batch"])


def test_defaults_and_bad_hparams():
    defaults = {name: {k: v.default for k, v in __import__("inspect").signature(OBJECTIVES[name]).parameters.items()}
                for name in ("ga", "graddiff", "npo", "simnpo", "dpo", "idkdpo", "undial", "rmu", "mox")}
    assert defaults["graddiff"] == {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll", "nll_reduction": "token"}
    assert (defaults["npo"]["beta"], defaults["dpo"]["beta"], defaults["idkdpo"]["beta"]) == (0.1, 0.1, 0.1)
    assert {k: defaults["simnpo"][k] for k in ("beta", "delta", "gamma", "alpha")} == \
        {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0}
    assert {k: defaults["undial"][k] for k in ("beta", "gamma", "alpha")} == {"beta": 10.0, "gamma": 1.0, "alpha": 0.0}
    assert {k: defaults["rmu"][k] for k in ("layer", "steering_coeff", "retain_loss", "trainable")} == \
        {"layer": 7, "steering_coeff": 2.0, "retain_loss": "embed_diff", "trainable": ".*"}
    assert defaults["ga"]["nll_reduction"] == "token" and defaults["mox"]["nll_reduction"] == "sample"
    with pytest.raises(ValueError, match="'graddiff': retain_loss must be one of \\['nll', 'kl'\\], got 'KL'"):
        get_objective("graddiff", retain_loss="KL")
    with pytest.raises(ValueError, match="'npo': nll_reduction must be one of"):
        get_objective("npo", nll_reduction="mean")
    with pytest.raises(ValueError, match="'simnpo': beta must be > 0"):
        get_objective("simnpo", beta=0.0)
    with pytest.raises(ValueError, match="'rmu': trainable '\\(' is not a regular expression"):
        get_objective("rmu", trainable="(")


def test_mox_alpha_is_not_the_retain_weight(world):
    """MOX's method.alpha (the extrapolation coefficient) never reaches a baseline's retain weight alpha."""
    cfg = load_config(None, ["method.alpha=4", "method=npo"])
    name, kwargs = get_method("npo").objective(cfg.method.params)
    from_spec = get_objective(name, **kwargs)
    loss = jax.jit(lambda p, r, b: from_spec(p, r, b, world["apply"])[0])(world["params"], world["ref"], world["batch"])
    expected = dpo_loss(world, None, world["batch"]["forget"], 0.1) + retain_nll(world)  # npo's defaults, alpha 1
    np.testing.assert_allclose(float(loss), float(expected), **TOL)


def test_missing_batch_keys(world):
    only_forget = {"forget": world["batch"]["forget"]}
    for name, key in [("dpo", "target"), ("idknll", "target"), ("graddiff", "retain"), ("rmu", "retain")]:
        obj = get_objective(name, **({"layer": 0} if name == "rmu" else {}))
        with pytest.raises(MissingBatchKeyError, match=f"'{name}' needs batch\\['{key}'\\]"):
            jax.eval_shape(lambda p, r: obj(p, r, only_forget, world["apply"]), world["params"], world["ref"])


def test_rmu_trainable_selects_layer_slices_of_stacked_parameters():
    """With layers stored stacked ([L, ...] under 'layers.<name>'), the same per-layer pattern selects slices."""
    from jaxunlearn.objectives.rmu import freeze_others

    params = {"layers": {"mlp": {"down_proj": {"kernel": jnp.ones((3, 2, 2))}}, "norm": {"scale": jnp.ones((3, 2))}},
              "embed": jnp.ones((4, 2))}
    pattern = r"layers\.(0|2)\.mlp\..*"
    grads = jax.grad(lambda p: sum((x ** 2).sum() for x in jax.tree.leaves(freeze_others(p, pattern))))(params)
    np.testing.assert_array_equal(np.asarray(grads["layers"]["mlp"]["down_proj"]["kernel"])[:, 0, 0], [2.0, 0.0, 2.0])
    assert float(jnp.abs(grads["layers"]["norm"]["scale"]).max()) == 0.0 and float(jnp.abs(grads["embed"]).max()) == 0.0
