"""`jaxunlearn plan SHAPE_OR_HF_FOLDER`: the memory and FLOPs of one train step, without running it.

Builds the real step (train.make_train_step with the registered objective, AdamW from optim.py,
the loss chunking and reference dtype of the run config), lowers and compiles it against
abstract parameters (ShapeDtypeStructs carrying their shardings; nothing is allocated) and
reports XLA's ahead-of-time analysis of the compiled per-device program:

  arguments    parameters, optimiser state, batch and frozen reference held by one device
  temporaries  everything else the step allocates (activations, logits chunks, gradients)
  outputs      new parameters, optimiser state and metrics; donated ones alias arguments
  total        arguments + temporaries + outputs - aliased (the device's peak for the step)

FLOPs: the analytic model FLOPs of the step (`analytic_flops`: forward and backward of the trained
model, forward of the frozen reference; rematerialisation not counted, as for MFU), and XLA's
cost analysis of the per-device program times the number of devices. XLA counts the body of a
loop (scanned layers, loss chunks) once, so it undercounts scanned programs.

`--devices N` simulates N CPU devices (sets XLA_FLAGS and JAX_PLATFORMS=cpu before JAX starts),
so an 8-device plan runs on a laptop. Python use: `plan(PlanSpec(...)) -> dict`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """What to plan: a model shape and one step's batch, mesh and precision settings."""

    shape: str  # a ModelConfig preset name or a Hugging Face folder with config.json
    forget: int = 32  # sequences in the forget batch
    retain: int = 32  # sequences in the retain batch
    target: int = 0  # sequences in the target batch (mox_targeted)
    seq_len: int = 512
    objective: str = "mox"
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights (and Adam state) dtype
    reference_dtype: str | None = None  # None = as param_dtype
    remat: str = "full"  # a models.config.REMAT_POLICIES name
    scan_layers: bool = True  # False: the layers unrolled in a Python loop (compile time grows with depth)
    loss_chunk: int = 128  # 0 = full logits


def model_config(spec: PlanSpec):
    """The ModelConfig of spec.shape: a preset name or a Hugging Face folder with config.json."""
    from jaxunlearn.models import ModelConfig

    folder = pathlib.Path(spec.shape)
    return ModelConfig.from_hf_folder(folder) if (folder / "config.json").is_file() else ModelConfig.preset(spec.shape)


def run_config(spec: PlanSpec):
    """The RunConfig sections the step depends on (model dtypes, mesh, loss chunk)."""
    from jaxunlearn.config import from_dict

    return from_dict({
        "model": {"dtype": spec.dtype, "param_dtype": spec.param_dtype, "reference_dtype": spec.reference_dtype,
                  "remat": spec.remat, "scan_layers": spec.scan_layers},
        "mesh": {"data": spec.data, "fsdp": spec.fsdp, "tensor": spec.tensor},
        "train": {"loss_chunk": spec.loss_chunk, "batch_size": max(spec.forget, spec.retain, 1)},
    }, where="plan")


def abstract_batch(spec: PlanSpec, mesh) -> dict:
    """ShapeDtypeStructs of one batch dict (forget, retain, target when asked), sharded like real ones."""
    import jax
    import jax.numpy as jnp

    from jaxunlearn.sharding import batch_sharding, check_batch_divisible

    sharding = batch_sharding(mesh)
    batch = {}
    for name, size in (("forget", spec.forget), ("retain", spec.retain), ("target", spec.target)):
        if size:
            check_batch_divisible(size, mesh, f"--{name}")
            row = jax.ShapeDtypeStruct((size, spec.seq_len), jnp.int32, sharding=sharding)
            batch[name] = {"input_ids": row, "attention_mask": row, "labels": row}
    return batch


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    import jax
    import numpy as np

    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# sequences of the batch that pass through the frozen reference, per objective (others: none)
REFERENCE_SPLITS = {"mox": ("retain",), "mox_targeted": ("retain",), "mox_npo": ("forget", "retain"),
                    "npo": ("forget",)}


def analytic_flops(model_cfg, params: int, spec: PlanSpec) -> float:
    """Model FLOPs of one step (the MFU convention, rematerialisation not counted): 3 forward
    passes per trained token, 1 per token of a frozen-reference forward; a forward costs
    2 N + 4 L T H d per token (N parameters touched per token: input embedding excluded, LM
    head counted; the second term is attention scores and values over T positions)."""
    n = params - model_cfg.vocab_size * model_cfg.hidden_size * (0 if model_cfg.tie_word_embeddings else 1)
    attention = 4 * model_cfg.num_layers * spec.seq_len * model_cfg.num_heads * model_cfg.head_dim
    per_token = 2 * n + attention
    sizes = {"forget": spec.forget, "retain": spec.retain, "target": spec.target}
    trained = sum(sizes.values())
    reference = sum(sizes[k] for k in REFERENCE_SPLITS.get(spec.objective, ()))
    return float(per_token * spec.seq_len * (3 * trained + reference))


def plan(spec: PlanSpec) -> dict:
    """Lower and compile one train step of `spec` against abstract parameters; return its analysis."""
    import jax

    from jaxunlearn import checkpoint as ck
    from jaxunlearn import optim, rundir, runner, train
    from jaxunlearn.models import param_count
    from jaxunlearn.objectives import get_objective
    from jaxunlearn.objectives.common import with_loss_chunk

    cfg = run_config(spec)
    setup = rundir.model_setup(model_config(spec), cfg)
    model_cfg = setup.model_cfg
    ref_abstract = ck.abstract_tree(
        jax.eval_shape(lambda p: runner.cast_reference(p, cfg.model.reference_dtype), setup.abstract), setup.shardings)
    optimizer, schedule, _ = optim.optimizer_from_spec(cfg.train, 100)
    opt_shardings = train.opt_state_shardings(optimizer, setup.abstract, setup.shardings, setup.mesh)
    opt_abstract = ck.abstract_tree(jax.eval_shape(optimizer.init, setup.abstract), opt_shardings)
    apply = with_loss_chunk(setup.apply, cfg.train.loss_chunk)
    step = train.make_train_step(get_objective(spec.objective), apply, optimizer, setup.mesh, setup.shardings,
                                 opt_shardings, schedule=schedule)
    batch = abstract_batch(spec, setup.mesh)

    start = time.perf_counter()
    lowered = step.lower(setup.abstract, opt_abstract, batch, ref_abstract)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    devices = setup.mesh.devices.size
    n_params = param_count(setup.abstract)
    held = {"params": setup.abstract, "opt_state": opt_abstract, "reference": ref_abstract, "batch": batch}
    args, temps, outs = mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes
    aliased = mem.alias_size_in_bytes
    return {
        "shape": spec.shape,
        "parameters": n_params,
        "devices": devices,
        "platform": jax.devices()[0].platform,
        "mesh": dict(setup.mesh.shape),
        "spec": dataclasses.asdict(spec),
        "arguments_per_device": {k: per_device_bytes(v) for k, v in held.items()},
        "memory_per_device": {
            "arguments": args, "temporaries": temps, "outputs": outs, "aliased": aliased,
            "generated_code": mem.generated_code_size_in_bytes, "total": args + temps + outs - aliased,
        },
        "flops_per_step_xla": float(cost.get("flops", 0.0)) * devices,
        "flops_per_step_analytic": analytic_flops(model_cfg, n_params, spec),
        "lower_seconds": lowered_at - start,
        "compile_seconds": done - lowered_at,
    }


def size(n: float) -> str:
    """Bytes in GiB (or MiB below 1 GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def format_report(r: dict) -> str:
    s, m = r["spec"], r["memory_per_device"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    ref = s["reference_dtype"] or s["param_dtype"]
    lines = [
        f"plan {r['shape']}: {r['parameters'] / 1e9:.2f} B parameters on {r['devices']} {r['platform']} devices, "
        f"mesh {mesh}",
        f"step: objective {s['objective']}, batch forget {s['forget']} + retain {s['retain']}"
        + (f" + target {s['target']}" if s["target"] else "") + f" x {s['seq_len']} tokens, "
        f"compute {s['dtype']}, params {s['param_dtype']}, reference {ref}, remat {s['remat']}, "
        f"{'scanned' if s['scan_layers'] else 'unrolled'} layers, loss_chunk {s['loss_chunk']}",
        "memory per device: " + ", ".join(
            f"{k} {size(m[k])}" for k in ("arguments", "temporaries", "outputs", "aliased", "total")),
        "arguments per device: " + ", ".join(f"{k} {size(v)}" for k, v in r["arguments_per_device"].items()),
        f"FLOPs per step: {r['flops_per_step_analytic']:.3e} model (analytic), {r['flops_per_step_xla']:.3e} "
        f"XLA cost analysis (counts loop bodies once)",
        f"compile: lower {r['lower_seconds']:.1f} s + compile {r['compile_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def backend_started() -> bool:
    """Whether JAX has created its devices (after which XLA_FLAGS no longer apply)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def simulate_devices(n: int) -> None:
    """Make JAX (its backend not yet started) see `n` CPU devices; if it already runs, require enough
    devices. Importing JAX does not start it (the CLI imports it to check for a multi-process run)."""
    if "jax" in sys.modules and backend_started():
        import jax

        if jax.device_count() < n:
            raise ValueError(f"--devices {n}: JAX is already running with {jax.device_count()} devices")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn plan", description="per-device memory, FLOPs and compile "
                                "time of one train step, from ahead-of-time compilation (nothing allocated)")
    p.add_argument("shape", help="model preset (e.g. Llama-3.1-8B, Llama-3.2-1B, Llama-2-7B, phi-1.5) "
                   "or a Hugging Face folder with config.json")
    d = PlanSpec(shape="")
    p.add_argument("--devices", type=int, help="simulate this many CPU devices")
    p.add_argument("--data", type=int, default=d.data, help="mesh data axis (-1 = the rest)")
    p.add_argument("--fsdp", type=int, default=d.fsdp, help="mesh fsdp axis (-1 = the rest)")
    p.add_argument("--tensor", type=int, default=d.tensor, help="mesh tensor axis")
    p.add_argument("--forget", type=int, default=d.forget, help="forget sequences per step")
    p.add_argument("--retain", type=int, default=d.retain, help="retain sequences per step")
    p.add_argument("--target", type=int, default=d.target, help="target sequences per step (mox_targeted)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--objective", default=d.objective, help="a registered objective (mox, npo, graddiff, ...)")
    p.add_argument("--remat", default=d.remat, help="per-layer remat policy: none, full, dots, "
                   "dots_with_no_batch_dims, save_qkv_proj, save_qkv_out_proj (as MaxText's)")
    p.add_argument("--no-scan-layers", action="store_true", help="unroll the layers (no jax.lax.scan)")
    p.add_argument("--dtype", default=d.dtype, help="compute dtype")
    p.add_argument("--param-dtype", default=d.param_dtype, help="master-weight dtype")
    p.add_argument("--reference-dtype", default=d.reference_dtype, help="frozen reference dtype (default: param dtype)")
    p.add_argument("--loss-chunk", type=int, default=d.loss_chunk, help="positions per logits chunk (0 = full)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    a = p.parse_args(argv)
    if a.devices:
        simulate_devices(a.devices)
    spec = PlanSpec(shape=a.shape, forget=a.forget, retain=a.retain, target=a.target, seq_len=a.seq_len,
                    objective=a.objective, data=a.data, fsdp=a.fsdp, tensor=a.tensor, dtype=a.dtype,
                    param_dtype=a.param_dtype, reference_dtype=a.reference_dtype, remat=a.remat,
                    scan_layers=not a.no_scan_layers, loss_chunk=a.loss_chunk)
    result = plan(spec)
    print(format_report(result))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
