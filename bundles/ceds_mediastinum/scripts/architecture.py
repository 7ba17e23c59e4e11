"""A checkpoint that carries its architecture: the network's constructor arguments saved beside the weights.

The same file in both bundles of the collection (a test keeps the copies identical).

``models/model.pt`` stays a plain ``state_dict`` (MONAI Label and the model-zoo CI load it as one). The training run
writes the arguments that shaped its network (widths, input channels, ...) to ``network.json`` in the same folder,
and ``inference.json`` reads each of them from there, falling back to its own default when the file is absent, so a
checkpoint trained at other widths (for example the quick start's ``cpu_demo`` ones) builds the matching network
without an overlay. Where they still do not fit, :class:`ArchitectureCheckpointLoader` says which checkpoint, which
argument and which weights differ, and how to fix it.

- :func:`saved_argument`: one constructor argument recorded beside a checkpoint, or a default.
- :class:`NetworkArgumentsSaver`: the training handler that writes ``network.json``.
- :class:`ArchitectureCheckpointLoader`: MONAI's ``CheckpointLoader`` with an error a person can act on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

__all__ = ["ARGUMENTS_FILE", "ArchitectureCheckpointLoader", "NetworkArgumentsSaver", "saved_argument",
           "saved_arguments"]

ARGUMENTS_FILE = "network.json"
"""The file, in a checkpoint's folder, that holds the constructor arguments of the network it was trained with."""


def saved_arguments(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The constructor arguments recorded beside ``checkpoint`` (``<its folder>/network.json``); ``{}`` without one.

    Args:
        checkpoint: path of a weights file (it need not exist).

    Returns:
        the recorded arguments, by name.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), ARGUMENTS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def saved_argument(checkpoint: str | os.PathLike, name: str, default: Any) -> Any:
    """One constructor argument of the network ``checkpoint`` was trained with, else ``default``.

    Args:
        checkpoint: path of a weights file.
        name: the argument's config key (for example ``"channels"``).
        default: the value when no ``network.json`` lies beside the checkpoint or it does not record ``name``.

    Returns:
        the recorded value, or ``default``.
    """
    return saved_arguments(checkpoint).get(name, default)


class NetworkArgumentsSaver:
    """Writes the network's constructor arguments to ``<save_dir>/network.json`` when training starts.

    Every checkpoint the run then saves in ``save_dir`` has the architecture recorded beside it. The file is replaced
    atomically, so ranks of a distributed run may all write it.

    Args:
        save_dir: the run's checkpoint folder (``@model_dir``).
        arguments: the arguments, by their config key (JSON-serialisable values).
    """

    def __init__(self, save_dir: str, arguments: Mapping[str, Any]) -> None:
        self.save_dir = save_dir
        self.arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, ARGUMENTS_FILE)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.arguments, f, indent=4)
        os.replace(tmp, path)


class ArchitectureCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for a plain ``state_dict``, whose error names what does not fit.

    When the weights' shapes do not match the network the config built, the error's first line names the
    checkpoint, the constructor arguments that differ from those recorded beside it (or, without a record, the
    config's values), the first mismatching weight with both shapes, and the fix.

    Args:
        load_path: the weights file.
        load_dict: ``{"model": network}``, as for ``CheckpointLoader``.
        arguments: the config's constructor arguments of the network, by config key (for the error message).
        kwargs: further ``CheckpointLoader`` arguments (``map_location``, ...).
    """

    def __init__(self, load_path: str, load_dict: dict, arguments: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        self.arguments = dict(arguments)

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
            return
        except RuntimeError as e:  # torch's message starts "Error(s) in loading state_dict" and lists every weight
            message = self._explain(e)
        raise ValueError(message)  # outside the except clause: the explanation is the innermost error

    def _explain(self, error: RuntimeError) -> str:
        network = next(iter(self.load_dict.values()))
        state = torch.load(self.load_path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        own = network.state_dict()
        shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        missing = sorted(set(own) - set(state))
        saved = saved_arguments(self.load_path)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in self.arguments.items()}
        differ = {k: (saved[k], v) for k, v in config.items() if k in saved and saved[k] != v}
        if differ:
            what = "; ".join(f"{k}: trained with {a}, the config builds {b}" for k, (a, b) in differ.items())
            fix = ("drop the overlay or override that sets " + ", ".join(differ)
                   + f" (the {ARGUMENTS_FILE} beside the checkpoint builds the matching network)")
        else:
            what = ("no " + ARGUMENTS_FILE + " beside it; the config builds "
                    + ", ".join(f"{k}={v}" for k, v in config.items()))
            fix = ("pass the overlay the checkpoint was trained with (for the quick start's weights: "
                   "configs/cpu_demo.json), or copy the training run's " + ARGUMENTS_FILE + " beside the checkpoint")
        if shapes:
            name, theirs, ours = shapes[0]
            detail = (f"{len(shapes)} weights differ in shape, first {name}: "
                      f"checkpoint {list(theirs)}, network {list(ours)}")
        elif missing:
            detail = f"{len(missing)} weights of the network are not in the checkpoint, first {missing[0]}"
        else:
            detail = str(error).splitlines()[0]
        return f"{self.load_path} does not fit the network: {what}. {detail}. Fix: {fix}."
