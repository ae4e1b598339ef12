"""Meshes and the mapping from logical axis names to mesh axes.

Model code names axes logically ('embed', 'heads', 'activation_batch', ...); which mesh axis
(data, fsdp, tensor, ...) shards each is data: a rules tuple that comes from config
(`logical_axis_rules`; `configs/common.py` starts from `LOGICAL_AXIS_RULES` below). Library
functions always take the rules explicitly; only an HF directory loaded for generation, which
has no config, runs with `LOGICAL_AXIS_RULES` as they are.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Any]]

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of axes, or None = replicated). FSDP shards
# weights over 'fsdp' on their model dimension; tensor parallelism splits heads, the MLP
# hidden and the vocabulary; the batch is split over every data-like axis.
LOGICAL_AXIS_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("vision_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),
    ("length", None),
    ("patch_y", None),
    ("patch_x", None),
    ("channel", None),
)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_sizes: dict[str, int] | None = None, granule: str = "auto") -> Mesh:
    """A mesh with the given axis sizes (one may be -1: the remaining devices), Auto axes.

    `dcn_sizes` splits axes across granules joined by the slower data-centre network: TPU
    slices (multi-slice) or hosts (GPU clusters, `granule='process'`). An axis's full size is
    then `axis_sizes[a] * dcn_sizes[a]`, and `axis_sizes` (with its -1) describes one
    granule. `granule='auto'` picks slices when devices carry a slice index, else processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {k: int((dcn_sizes or {}).get(k, 1)) for k in axis_sizes}
    unknown = set(dcn_sizes or {}) - set(axis_sizes)
    if unknown:
        raise ValueError(f"dcn mesh axes {sorted(unknown)} are not mesh axes {list(axis_sizes)}")
    n_granules = math.prod(dcn.values())
    if len(devices) % n_granules:
        raise ValueError(f"{len(devices)} devices do not split into {n_granules} DCN granules")
    sizes = _resolve_sizes(axis_sizes, len(devices) // n_granules)
    names = tuple(sizes)
    types = (AxisType.Auto,) * len(names)
    if n_granules == 1:
        try:
            return jax.make_mesh(tuple(sizes.values()), names, axis_types=types,
                                 devices=devices)
        except NotImplementedError as e:
            # Large TPU slices: an axis that does not map onto whole physical axes (tensor=2
            # on a 4x8x8 v5p-512) is laid out by splitting a physical axis instead.
            try:
                array = mesh_utils.create_device_mesh(tuple(sizes.values()), devices,
                                                      allow_split_physical_axes=True)
            except (NotImplementedError, ValueError, AssertionError):
                raise ValueError(
                    f"mesh {sizes} has no device layout on {len(devices)} "
                    f"{devices[0].device_kind} devices ({e}); mesh shapes whose axes are "
                    "products of the slice's physical axes always work") from e
            log.info("mesh %s: a physical axis is split to lay it out", sizes)
            return Mesh(array, names, axis_types=types)

    by_process = (granule == "process" or
                  (granule == "auto" and getattr(devices[0], "slice_index", None) is None))
    array = mesh_utils.create_hybrid_device_mesh(
        tuple(sizes.values()), tuple(dcn[k] for k in names), devices,
        process_is_granule=by_process)
    return Mesh(array, names, axis_types=types)


def _resolve_sizes(axis_sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    sizes = dict(axis_sizes)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % known:
            raise ValueError(f"{n_devices} devices do not divide into mesh {axis_sizes}")
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                         f"have {n_devices}")
    return sizes


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (logged), so any size loads."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for a in names:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
            else:
                log.warning("%s: dim %d not divisible by mesh axis %r; not sharded on it",
                            where, dim, a)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of logically partitioned (boxed) values or abstract values."""
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = plain(boxed_tree)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_specs = jax.tree_util.tree_leaves(
        mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    out = [NamedSharding(mesh, _fit(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))
           for (path, leaf), spec in zip(paths, flat_specs)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def plain(boxed_tree):
    """The tree without its axis-name boxes and without sharding constraints (`nn.unbox`
    would constrain under an active mesh, which abstract values cannot take)."""
    return nn.meta.map_axis_meta(
        lambda x: x.unbox(apply_constraint=False) if hasattr(x, "get_partition_spec")
        else x.unbox(), boxed_tree)


def with_shardings(abstract_tree, shardings):
    """Abstract values (ShapeDtypeStructs) that carry their target shardings: what Orbax
    restores into and what ahead-of-time lowering takes."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


def single_device_mesh() -> Mesh:
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes a batch's rows are split over (logical 'activation_batch')."""
    axes = nn.logical_to_mesh_axes(("activation_batch",), rules)[0]
    return () if not axes else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_ways(mesh: Mesh, rules: Rules) -> int:
    """How many ways a batch's rows are split on `mesh` (the product of its batch axes)."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules) -> NamedSharding:
    """Sharding for a batch-major input array of rank `ndim`."""
    spec = nn.logical_to_mesh_axes(("activation_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules):
    """Context: `mesh` as the current mesh and `rules` for the model's logical constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
