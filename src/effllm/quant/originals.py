"""The float modules a reversible quantization replaced, kept so that undoing it is exact.

``effllm.patch(model, quant=...)`` must restore the model bit for bit on ``unpatch()``, but
holding the float weights in memory would cost what quantization saves. ``KeptOriginals`` keeps
the original module objects and, with ``where="disk"`` (the default), moves their float tensors
to a temporary safetensors file and empties them in memory; ``restore`` reads them back into the
same ``Parameter`` objects. Tensors the model still uses elsewhere (a tied embedding) stay put.
The file is deleted on restore, or when the store is garbage collected.
"""

from __future__ import annotations

import os
import tempfile
import weakref

import torch
from torch import nn

WHERE = ("disk", "memory")


def check_where(where) -> None:
    if where not in WHERE:
        raise ValueError(f"quant_originals must be one of {WHERE}, got {where!r}")


class KeptOriginals:
    """Original modules by name; their float tensors in memory or offloaded to a file."""

    def __init__(self, where: str = "disk"):
        check_where(where)
        self.where = where
        self.modules: dict[str, nn.Module] = {}
        self._emptied: list[tuple[str, torch.Tensor, torch.device]] = []  # (file key, tensor, device)
        self.path: str | None = None
        self._cleanup = None

    def add(self, name: str, module: nn.Module) -> None:
        self.modules[name] = module

    @property
    def offloaded_bytes(self) -> int:
        return os.path.getsize(self.path) if self.path and os.path.exists(self.path) else 0

    def offload(self, model: nn.Module) -> None:
        """With ``where="disk"``: write the originals' tensors that ``model`` no longer uses to a
        temporary file, then empty them. Nothing is emptied unless the file was fully written."""
        if self.where != "disk" or self._emptied:
            return
        in_use = {id(t) for t in (*model.parameters(), *model.buffers())}
        chosen: dict[int, tuple[str, torch.Tensor]] = {}
        for name, module in self.modules.items():
            for key, tensor in (*module.named_parameters(), *module.named_buffers()):
                if (id(tensor) not in in_use and id(tensor) not in chosen and tensor.numel()
                        and tensor.device.type != "meta"):
                    chosen[id(tensor)] = (f"{name}.{key}", tensor)
        if not chosen:
            return
        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(prefix="effllm-originals-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({key: t.detach().cpu().contiguous() for key, t in chosen.values()}, path)
        except BaseException:
            os.unlink(path)
            raise
        self._set_path(path)
        for key, tensor in chosen.values():
            self._emptied.append((key, tensor, tensor.device))
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def restore(self, model: nn.Module) -> None:
        """Refill the emptied tensors from the file and put the original modules back."""
        from .api import replace_module

        if self._emptied:
            from safetensors.torch import load_file

            saved = load_file(self.path, device="cpu")
            for key, tensor, device in self._emptied:
                tensor.data = saved.pop(key).to(device)
            self._emptied = []
        for name, module in self.modules.items():
            replace_module(model, name, module)
        self._drop_file()

    def _set_path(self, path: str) -> None:
        self.path = path
        self._cleanup = weakref.finalize(self, _unlink, path)

    def _drop_file(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
        self.path, self._cleanup = None, None

    # A deep copy or pickle of a patched model carries the originals' tensors in memory and
    # writes its own file: copies never share (and delete) one file.
    def __getstate__(self) -> dict:
        state = {"where": self.where, "modules": self.modules, "emptied": [], "saved": {}}
        if self._emptied:
            from safetensors.torch import load_file

            state["saved"] = load_file(self.path, device="cpu")
            state["emptied"] = self._emptied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["where"])
        self.modules = state["modules"]
        if state["emptied"]:
            from safetensors.torch import save_file

            fd, path = tempfile.mkstemp(prefix="effllm-originals-", suffix=".safetensors")
            os.close(fd)
            save_file(state["saved"], path)
            self._set_path(path)
            self._emptied = state["emptied"]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
