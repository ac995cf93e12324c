"""Compile a pure forward once into SPU executables, cut into op-group segments.

SPU 0.9.5 profiles per pphlo op *name* over a whole run, so one executable cannot say whether
a ``pphlo.multiply`` belonged to a LayerNorm, the quad activation or the 2Quad normaliser.
To attribute cost honestly, the forward's jaxpr is cut into consecutive segments, each of
one group, and every segment is compiled as its own SPU executable; the nodes run them in
order, handing intermediates over as secret variables that stay inside SPU (no reveal, no
extra communication). Each segment's profile then belongs to exactly one group.

A jaxpr equation's group comes from where it was traced (its Python traceback), innermost
frame first:
  * a GeLU replacement in ``approx.GELU_APPROX``                 -> ``activation``
  * a softmax replacement in ``approx.SOFTMAX_APPROX``           -> ``attention_normaliser``
  * a LayerNorm replacement in ``approx.NORM_APPROX``, flax's normalisation module or a
    function named *layer_norm*                                    -> ``layernorm``
  * a function or module named *embed* / *lookup*                 -> ``embedding``
  * otherwise a matrix product (``dot_general``)                  -> ``linear`` (this includes
    the attention score and context products Q K^T and P V)
  * otherwise                                                     -> ``other`` (the pooler's
    tanh, the attention scale, casts)
Ops that need no communication under any protocol (adds, reshapes, broadcasts...) join the
segment before them, so they never split a segment. ``attribution="ops"`` compiles the forward
as one executable instead, and the report groups by pphlo op name (coarser, see cost.py).
"""

from __future__ import annotations

import ast
import functools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import spu.libspu as libspu
from jax import core as jcore  # Jaxpr, Var, Literal, DropVar (jax 0.4.34)
from spu.utils import frontend as spu_fe

from mpcformer_jax import approx
from mpcformer_jax.private.program import INPUT_NAMES, OUTPUT_NAME, CompiledForward, Segment

_FREE = {"add", "sub", "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze",
         "expand_dims", "slice", "concatenate", "copy", "copy_p", "stop_gradient",
         "reduce_sum", "iota", "pad", "rev", "select_n_public", "convert_element_type",
         "make_cached_var"}  # the Beaver-cache mark (model.with_cached_weights): no cost
_APPROX_FILE = Path(approx.__file__).resolve()
_ACT_NAMES = {f.__name__ for f in approx.GELU_APPROX.values()}
_ACT_NAMES |= {"quad_folded"}
_NORM_NAMES = {f.__name__ for f in approx.SOFTMAX_APPROX.values()} | {
    "_normalise", "_calibrated_reciprocal", "query_key_weights",
    "client_key_weights_scaled"}
_LN_NAMES = {f.__name__ for f in approx.NORM_APPROX.values()}


@functools.cache
def _file_functions(file: str) -> dict[int, str]:
    """Maps first line (def or decorator) -> qualified name for every function in a file."""
    try:
        tree = ast.parse(Path(file).read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    names: dict[int, str] = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    for line in [child.lineno] + [d.lineno for d in child.decorator_list]:
                        names[line] = qual
                visit(child, qual + ".")

    visit(tree, "")
    return names


def _frame_group(frame) -> str | None:
    file = frame.file_name
    if Path(file).resolve() == _APPROX_FILE:
        if frame.function_name in _ACT_NAMES:
            return "activation"
        if frame.function_name in _NORM_NAMES:
            return "attention_normaliser"
        if frame.function_name in _LN_NAMES:
            return "layernorm"
        return None
    if file.endswith("flax/linen/normalization.py"):
        return "layernorm"
    if "site-packages" in file or "/jax/" in file:
        return None
    qual = _file_functions(file).get(frame.function_start_line, frame.function_name)
    if re.search(r"layer_?norm", qual, re.I):
        return "layernorm"
    if re.search(r"embed|lookup", qual, re.I):
        return "embedding"
    return None


def classify(eqn) -> str | None:
    """The op group of one jaxpr equation, or None for an op that never communicates."""
    tb = eqn.source_info.traceback
    for frame in (tb.frames if tb is not None else []):
        group = _frame_group(frame)
        if group is not None:
            return group
    name = eqn.primitive.name
    if name == "dot_general":
        return "linear"
    if name in _FREE or (name == "mul" and _has_literal(eqn)):
        return None
    return "other"


def _has_literal(eqn) -> bool:
    # x * constant is local under every protocol but truncation; kept free to avoid tiny cuts.
    return any(isinstance(v, jcore.Literal) for v in eqn.invars)


def _split(eqns) -> list[tuple[str, list]]:
    groups = [classify(e) for e in eqns]
    first = next((g for g in groups if g is not None), "other")
    runs: list[tuple[str, list]] = []
    current = first
    for eqn, group in zip(eqns, groups, strict=True):
        group = group or current  # a free op joins the segment before it
        if not runs or group != runs[-1][0]:
            runs.append((group, []))
        runs[-1][1].append(eqn)
        current = group
    return runs


def _specs(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def compile_forward(fn: Callable, params, inputs: tuple, copts: libspu.CompilerOptions,
                    attribution: str = "segments") -> CompiledForward:
    """Traces ``fn(params, *inputs)`` and compiles it for SPU, all inputs secret.

    Args:
      fn: a pure function of (params, *inputs) returning one array (the logits).
      params, inputs: arrays or ShapeDtypeStructs; only shapes and dtypes are used.
      copts: SPU compiler options.
      attribution: "segments" (one executable per op group run, exact attribution) or "ops"
        (one executable; grouping by pphlo op name).
    """
    if attribution not in ("segments", "ops"):
        raise ValueError(f"attribution must be 'segments' or 'ops', got {attribution!r}")
    start = time.perf_counter()
    params, inputs = _specs(params), _specs(inputs)
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    param_names = tuple("p:" + jax.tree_util.keystr(p) for p, _ in paths)
    input_names = INPUT_NAMES[:len(inputs)] if len(inputs) <= len(INPUT_NAMES) else tuple(
        f"x:{i}" for i in range(len(inputs)))
    closed = jax.make_jaxpr(fn)(params, *inputs)
    jaxpr, consts = closed.jaxpr, closed.consts
    if len(jaxpr.outvars) != 1:
        raise ValueError(f"the private forward must return one array, got {len(jaxpr.outvars)}")
    out_var = jaxpr.outvars[0]

    names: dict[Any, str] = dict(zip(jaxpr.invars, param_names + input_names, strict=True))
    const_of = dict(zip(jaxpr.constvars, consts, strict=True))
    secret = set(jaxpr.invars)  # every input is secret: the weights and the client's data
    if attribution == "ops":
        runs = [("all", list(jaxpr.eqns))]
    else:
        runs = _split(jaxpr.eqns)

    # Which segment reads each variable last, so intermediates are freed as soon as possible.
    last_use: dict[Any, int] = {}
    for i, (_, eqns) in enumerate(runs):
        for eqn in eqns:
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    last_use[v] = i
    last_use[out_var] = len(runs)

    segments = []
    for i, (group, eqns) in enumerate(runs):
        defined = {v for e in eqns for v in e.outvars if not isinstance(v, jcore.DropVar)}
        needed = []
        for e in eqns:
            for v in e.invars:
                if isinstance(v, jcore.Var) and v not in defined and v not in needed:
                    needed.append(v)
        seg_consts = [v for v in needed if v in const_of]
        seg_in = [v for v in needed if v not in const_of]
        seg_out = [v for v in defined if last_use.get(v, -1) > i]
        seg_out.sort(key=lambda v: v.count if hasattr(v, "count") else id(v))
        for e in eqns:
            if any(v in secret for v in e.invars if isinstance(v, jcore.Var)):
                secret.update(v for v in e.outvars if not isinstance(v, jcore.DropVar))
        for j, v in enumerate(seg_out):
            names[v] = OUTPUT_NAME if v is out_var else f"t{i}.{j}"
        sub = jcore.Jaxpr(seg_consts, seg_in, seg_out, eqns,
                          jcore.join_effects(*(e.effects for e in eqns)))
        const_vals = [const_of[v] for v in seg_consts]

        def seg_fn(*args, _sub=sub, _consts=const_vals):
            return jcore.eval_jaxpr(_sub, _consts, *args)

        seg_name = f"s{i:03d}_{group}"
        seg_fn.__name__ = seg_name
        vis = [libspu.Visibility.VIS_SECRET if v in secret else libspu.Visibility.VIS_PUBLIC
               for v in seg_in]
        in_specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in seg_in]
        in_names = [names[v] for v in seg_in]
        out_names = [names[v] for v in seg_out]
        exe, _ = spu_fe.compile(spu_fe.Kind.JAX, seg_fn, in_specs, {}, in_names, vis,
                                lambda _outs, _n=out_names: list(_n), copts=copts)
        drop = tuple(names[v] for v in seg_in
                     if last_use.get(v) == i and names[v].startswith("t"))
        segments.append(Segment(seg_name, group, exe.SerializeToString(), tuple(in_names),
                                tuple(out_names), drop))
    if out_var not in secret:
        raise ValueError("the forward's output does not depend on its inputs")
    return CompiledForward(tuple(segments), param_names, input_names,
                           tuple(tuple(np.shape(x)) for x in inputs), OUTPUT_NAME,
                           tuple(out_var.aval.shape), time.perf_counter() - start, attribution)


_CACHE: dict[Any, CompiledForward] = {}


def compile_cached(key: Any, fn: Callable, params, inputs: tuple,
                   copts: libspu.CompilerOptions, attribution: str = "segments"):
    """``compile_forward`` memoised on (key, input shapes, compiler options, attribution).

    ``key`` identifies the function (e.g. the hashable model config); shapes are added here,
    so one model compiles once per batch shape and is then reused for every call.
    """
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves((params, inputs)))
    copts_key = tuple(sorted((k, getattr(copts, k)) for k in dir(copts)
                             if not k.startswith("_") and not callable(getattr(copts, k))
                             and k != "xla_pp_kind"))
    full_key = (key, shapes, copts_key, attribution)
    if full_key not in _CACHE:
        _CACHE[full_key] = compile_forward(fn, params, inputs, copts, attribution)
    return _CACHE[full_key]


def cache_size() -> int:
    """Number of compiled forwards held (tests use it to check compile-once)."""
    return len(_CACHE)
