"""Orbax checkpoints of a whole training run: ``TrainState`` (model, optimizer, step, RNG) + data iterator
state.

The only module of the package that imports orbax. One ``Checkpointer`` wraps an ``ocp.CheckpointManager``:

* items per step: ``state`` (arrays, as a nested dict keyed by the pytree path so checkpoints stay readable
  and independent of pytree node classes), ``data`` (the iterator's ``get_state()``, JSON) and ``meta`` (JSON:
  the config and anything else the caller wants kept with the weights);
* atomic: orbax writes a step into a temporary folder and renames it only once every item is on disk, and
  ``latest_step`` lists finalized steps only, so a process killed mid-write leaves nothing that restores and
  the previous checkpoint is used;
* the newest ``keep`` are kept; saving can be asynchronous (training continues while arrays are written).

Beside it, what guards and reads a run's checkpoints: :func:`config_changes` (resume refuses a checkpoint
written under another experiment config), :class:`InitConfig` (where a fine-tune or inference run takes its
weights) and :func:`restore_model` (a run's trained model, params only, rebuilt from the config stored with
it).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from selmerge_jax.config_io import from_dict
from selmerge_jax.models.config import ModelConfig
from selmerge_jax.models.llama import Llama
from selmerge_jax.models.lora import LoRAConfig, apply_lora
from selmerge_jax.models.lora import trainable_filter as lora_filter
from selmerge_jax.training.config import TrainConfig
from selmerge_jax.validation import UserError, check_choice, check_positive_int

__all__ = ["RESUMABLE_CHANGES", "CheckpointError", "Checkpointer", "InitConfig", "allowed_change",
           "config_changes", "config_differences", "finalized_steps", "nested_to_tree", "require_checkpoint",
           "restore_model", "stack_layer_entries", "stored_config", "stored_meta", "tree_to_nested"]


class CheckpointError(UserError):
    """A checkpoint step that cannot be read: its files are truncated, corrupted or half-written (or belong to
    a model of other shapes). The message names the step and the directory."""


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _paths(tree) -> tuple[list[tuple[str, ...]], list, Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def tree_to_nested(tree) -> dict:
    """Any pytree -> nested dict of its leaves keyed by path components (``params/layers/0/kernel/value``)."""
    out: dict = {}
    for path, leaf in zip(*_paths(tree)[:2]):
        if not path:
            raise ValueError("tree_to_nested needs a container pytree, got a bare leaf")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return out


def nested_to_tree(nested: dict, target):
    """Inverse of :func:`tree_to_nested`: leaves of ``nested`` put into ``target``'s structure."""
    paths, _, treedef = _paths(target)
    leaves = []
    for path in paths:
        node = nested
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"checkpoint has no entry {'/'.join(path)} that the target state expects "
                               "(was it written by a different model or optimizer config?)")
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def stack_layer_entries(nested):
    """``{'layers': {'0': tree, '1': tree, ...}}`` anywhere in ``nested`` -> ``{'layers': tree of [L, ...]}``.

    Returns ``nested`` itself (the same object) when it holds no per-layer subtrees.
    """
    if not isinstance(nested, dict):
        return nested
    out, changed = {}, False
    for key, value in nested.items():
        if key == "layers" and isinstance(value, dict) and value and all(k.isdigit() for k in value):
            layers = [stack_layer_entries(value[str(i)]) for i in range(len(value))]
            out[key] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
            changed = True
        else:
            out[key] = stack_layer_entries(value)
            changed = changed or out[key] is not value
    return out if changed else nested


def _like(value, target):
    """``value`` with ``target``'s dtype, and its sharding when it has one."""
    value = np.asarray(value).astype(target.dtype)
    sharding = getattr(target, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _restore_args(x: jax.ShapeDtypeStruct):
    local = jax.local_devices()[0]  # this process's: in a multi-process job jax.devices()[0] may be another's
    sharding = x.sharding if x.sharding is not None else jax.sharding.SingleDeviceSharding(local)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)


def _json_safe(state):
    """Grain iterators may hand back ``bytes``; JSON needs text."""
    if isinstance(state, bytes):
        return {"__bytes_b64__": base64.b64encode(state).decode("ascii")}
    if isinstance(state, dict):
        return {str(k): _json_safe(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_json_safe(v) for v in state]
    return state


def _from_json_safe(state):
    if isinstance(state, dict):
        if set(state) == {"__bytes_b64__"}:
            return base64.b64decode(state["__bytes_b64__"])
        return {k: _from_json_safe(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_from_json_safe(v) for v in state]
    return state


def stored_meta(directory: str | os.PathLike, step: int) -> dict:
    """The JSON ``meta`` of a finalized checkpoint step, read as a file: no JAX backend, no orbax manager (a
    coordinating process that must not take device memory can check which config a run was trained with)."""
    path = os.path.join(os.fspath(directory), str(step), "meta", "metadata")
    with open(path, encoding="utf-8") as f:
        return _from_json_safe(json.load(f)) or {}


def finalized_steps(directory: str | os.PathLike) -> list[int]:
    """The finalized steps of a checkpoint directory, read from the file system (orbax renames a step's
    temporary folder to the bare step number only once it is complete); [] when there is no directory."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def require_checkpoint(directory: str | os.PathLike | None, what: str = "init.path") -> str:
    """``directory`` as an absolute path if it holds a finalized checkpoint; otherwise a :class:`UserError`
    naming ``what`` (nothing is created: a typo must not become an empty run directory)."""
    if not directory:
        raise UserError(f"{what}={directory!r}: must be a checkpoint directory (.../checkpoints)")
    path = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if not os.path.isdir(path):
        raise UserError(f"{what}={os.fspath(directory)!r}: no such directory")
    if not finalized_steps(path):
        raise UserError(f"{what}={os.fspath(directory)!r}: holds no finalized checkpoint step (expected "
                        "numbered step folders, e.g. a run's <output_dir>/checkpoints)")
    return path


def stored_config(directory: str | os.PathLike, step: int | None = None, what: str = "init.path") -> dict:
    """The experiment config stored with a checkpoint (``step``, default the newest), read as a file."""
    path = require_checkpoint(directory, what)
    step = finalized_steps(path)[-1] if step is None else step
    try:
        return stored_meta(path, step).get("config") or {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint step {step} in {path}: its meta cannot be read ({e})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


class Checkpointer:
    """Saves and restores ``(TrainState, data_state, meta)`` by optimizer step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        check_positive_int("keep", keep)
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def _read(self, step: int, args):
        """``manager.restore`` with any failure of the stored files turned into a one-line
        :class:`CheckpointError` naming the step and directory (orbax's own traceback runs to hundreds of
        lines)."""
        try:
            return self._manager.restore(step, args=args)
        except Exception as error:  # orbax and tensorstore raise many types for one bad file
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read (corrupted, "
                                  f"half-written, or of another model): {_first_line(error)}") from error

    def set_aside(self, step: int) -> str:
        """Moves an unreadable ``step`` out of the directory (to ``<directory>.corrupt/<step>``), so that a
        resumed run falls back to the previous step and can write this step again; returns where it went."""
        target = os.path.join(self.directory + ".corrupt", str(step))
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(self.directory + ".corrupt", f"{step}.{suffix}"), suffix + 1
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), target)
        self._manager.reload()
        return target

    def latest_step(self) -> int | None:
        """The newest *finalized* step (a half-written one is invisible), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, *, data_state=None, meta: dict | None = None) -> bool:
        """Starts saving ``state`` as ``step`` (returns at once when async); False if that step exists."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree_to_nested(state)),
                                  data=ocp.args.JsonSave(_json_safe(data_state or {})),
                                  meta=ocp.args.JsonSave(_json_safe(meta or {})))
        return self._manager.save(step, args=args, force=True)

    def restore(self, target, step: int | None = None):
        """Returns ``(state, data_state, meta)`` of ``step`` (default newest), shaped and sharded like
        ``target``.

        ``target`` is a state of the same structure (concrete arrays or ``jax.ShapeDtypeStruct`` leaves); its
        shardings decide where restored arrays live.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        abstract = tree_to_nested(jax.tree.map(_abstract, target))
        try:
            restored = self._read(step, ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
            state = nested_to_tree(restored["state"], target)
        except (ValueError, KeyError, TypeError) as error:
            restored, state = self._restore_per_layer(step, target, error)
        return state, _from_json_safe(restored["data"]) or None, _from_json_safe(restored["meta"]) or {}

    def _restore_per_layer(self, step: int, target, error: Exception):
        """A checkpoint of the model's earlier layout, one subtree per layer (``layers/0/...``), restored into
        today's stacked layers (``layers/...`` with a leading ``[L]`` axis); anything else re-raises
        ``error``."""
        restored = self._read(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        stacked = stack_layer_entries(restored["state"])
        if stacked is restored["state"]:
            raise error
        try:
            state = nested_to_tree(stacked, target)
        except KeyError:
            raise error from None
        state = jax.tree.map(_like, state, target)
        return restored, state

    def restore_parts(self, target: Mapping, step: int | None = None) -> dict:
        """Only the top-level entries of the ``state`` item named by ``target`` (e.g. ``{"params": ...,
        "rest": ...}``), shaped and sharded like it; nothing else of the step is read (an inference run never
        loads the optimizer moments, which for AdamW are twice the trainable parameters in float32).

        A checkpoint of the earlier per-layer layout is read entry by entry and stacked."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        abstract = tree_to_nested(jax.tree.map(_abstract, dict(target)))
        try:
            restored = self._partial(step, abstract, jax.tree.map(_restore_args, abstract))
            return nested_to_tree(restored, dict(target))
        except (ValueError, KeyError, TypeError) as error:
            try:
                stored = self._manager.item_metadata(step)["state"]
            except Exception:  # noqa: BLE001 (unreadable metadata: report the first failure)
                raise error from None
            wanted = {k: stored[k] for k in abstract if k in stored}
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            stacked = stack_layer_entries(self._partial(step, wanted, as_numpy))
            try:
                parts = nested_to_tree(stacked, dict(target))
            except KeyError:
                raise error from None
            return jax.tree.map(_like, parts, dict(target))

    def _partial(self, step: int, item, restore_args):
        restored = self._read(step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))
        return restored["state"]

    def read_meta(self, step: int | None = None) -> dict:
        """Only the JSON ``meta`` of a checkpoint (e.g. the config needed to rebuild the model before
        restore)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        restored = self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return _from_json_safe(restored["meta"]) or {}

    def wait(self):
        """Blocks until an asynchronous save has been finalized."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# What a resumed run may change without being asked: its bookkeeping, where files live, the device mesh.
# Anything else (model, data mix, optimizer, seed, CRD schedule, and the length: ``train.steps`` sets the
# learning-rate schedule) makes "resume" continue a different experiment unless the user allows that field
# (``checkpoint.allow_changes``, the CLI's ``--allow-change``).
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.eval_batches", "train.progress",
                     "train.wandb", "train.output_dir", "checkpoint.", "mesh.", "init.", "data.data_dir",
                     "data.train_npy", "data.validation_npy")


def allowed_change(key: str, allowed: Sequence[str]) -> bool:
    """Whether dotted ``key`` is covered by ``allowed``: the key itself, its last components
    (``learning_rate`` covers ``optimizer.learning_rate``) or a prefix ending in '.' (``crd.``)."""
    return any(key == a or key.endswith("." + a) or (a.endswith(".") and key.startswith(a)) for a in allowed)


def config_differences(stored: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored value, current value)}`` for every value that differs between two
    ``config_to_dict`` trees; tuples and lists compare equal.

    A key on one side only is a field the other version of the code did not have (a checkpoint written before
    a field with a default was added): not a change. A value on one side where the other has a section (``crd:
    null`` against ``crd: {...}``) is.
    """
    flat_a, flat_b = _flatten(stored), _flatten(current)
    out = {k: (flat_a[k], flat_b[k]) for k in set(flat_a) & set(flat_b) if flat_a[k] != flat_b[k]}
    for key in set(flat_a) ^ set(flat_b):
        other = flat_b if key in flat_a else flat_a
        if any(o.startswith(key + ".") for o in other):
            out[key] = (_section(flat_a, key), _section(flat_b, key))
    return dict(sorted(out.items()))


def config_changes(stored: Mapping, current: Mapping,
                   allowed: Sequence[str] = RESUMABLE_CHANGES) -> list[str]:
    """The keys of :func:`config_differences` that ``allowed`` (see :func:`allowed_change`) does not cover."""
    return [k for k in config_differences(stored, current) if not allowed_change(k, allowed)]


def _section(flat: dict, key: str):
    """The value at ``key`` of a flattened tree, or the section below it as a flat dict."""
    return flat.get(key, {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")})


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, Mapping) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: _plain(tree)}


def _plain(value):
    """JSON's view of a value (a checkpoint stores lists where the config holds tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Where a fine-tune or inference run gets its weights.

    Attributes:
      kind: "checkpoint" (our orbax run directory; the model config is read from it), "hf" (a local Hugging
        Face Llama/Mistral directory) or "scratch" (random init from ``model``).
      path: the checkpoint directory (``.../checkpoints``) or HF directory.
      step: checkpoint step (default: the newest).
    """

    kind: Literal["checkpoint", "hf", "scratch"] = "scratch"
    path: str | None = None
    step: int | None = None

    def __post_init__(self):
        check_choice("InitConfig.kind", self.kind, ("checkpoint", "hf", "scratch"))
        if self.kind != "scratch" and not self.path:
            raise ValueError(f"InitConfig.path is required with kind={self.kind!r}")


def restore_model(checkpoint_dir: str, step: int | None = None) -> tuple[Llama, dict]:
    """The trained model of a run (weights of ``step``, default newest) and the run's stored config dict.

    The model is rebuilt from the stored config's ``model``, ``lora`` and ``train`` sections (a pretraining or
    a fine-tuning run alike; its weights come from this checkpoint, not from where it started). Only the
    ``params`` and ``rest`` entries of the train state are read, never the optimizer state.
    """
    ckpt = Checkpointer(require_checkpoint(checkpoint_dir))
    try:
        meta = ckpt.read_meta(step)
        stored = meta["config"]
        model_cfg = from_dict(ModelConfig, stored["model"], "model")
        lora = from_dict(LoRAConfig, stored["lora"], "lora") if stored.get("lora") else None
        train = from_dict(TrainConfig, stored.get("train"), "train")
        trainable = lora_filter(lora) if lora is not None else nnx.Param

        def build() -> Llama:
            model = Llama(model_cfg, rngs=nnx.Rngs(train.seed))
            if lora is not None:
                apply_lora(model, lora, rngs=nnx.Rngs(train.seed + 1))
            return model

        # Shapes only: nothing is initialised before the stored arrays arrive, and only the weights are read.
        graphdef, params, rest = nnx.split(nnx.eval_shape(build), trainable, ...)
        parts = ckpt.restore_parts({"params": params, "rest": rest}, step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, parts["params"], parts["rest"]), stored
