"""Load model weights without ever running code from the checkpoint file.

Checkpoints come from users and the internet; a pickle can execute anything
when loaded.  So: ``.safetensors`` goes through safetensors (no code at all);
anything else goes through ``torch.load(..., weights_only=True)`` with the flag
passed explicitly (an explicit flag is not overridden by
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), and, as a second lock that does not
depend on the torch version, every pickle in the file is scanned with
:mod:`pickletools` first and refused if it names a global outside a short
allow-list of tensor-rebuilding functions.  Every failure is one
:class:`CheckpointError` line that names the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickletools
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CheckpointError", "load_state_dict", "file_digest", "apply_state_dict", "save_safetensors"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


# --- pickle scan ------------------------------------------------------------

_STRING_OPS = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "SHORT_BINSTRING", "BINSTRING", "STRING",
}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_NEUTRAL_OPS = {"PROTO", "FRAME"}  # do not touch the stack
_TORCH_TYPES = (torch.dtype, torch.device, torch.layout, torch.memory_format)
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy (non-zip) format


def _global_ok(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    if module == "torch._utils" and name.startswith("_rebuild_"):
        return True
    if module == "torch" and "." not in name:
        obj = getattr(torch, name, None)
        if isinstance(obj, _TORCH_TYPES):
            return True
        return name.endswith("Storage") and isinstance(obj, type)
    return False


def _scan_pickle(stream) -> Any:
    """Raise ValueError if the next pickle in ``stream`` names a non-allowed global.

    Returns the value of a lone integer pickle (to recognise the legacy magic
    number) or None.  STACK_GLOBAL is accepted only when both operands are
    provably strings (pushed directly or fetched from a memo slot that was
    filled right after a string push); anything murkier is refused.
    """
    memo: dict[int, str | None] = {}
    last: list[str | None] = []  # values of the stack-changing ops, None if not a known string
    lone_int = None
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in _NEUTRAL_OPS:
            continue
        if name in _PUT_OPS or name == "MEMOIZE":
            key = len(memo) if name == "MEMOIZE" else arg
            memo[key] = last[-1] if last else None
            continue
        if name in _STRING_OPS:
            last.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
        elif name in _GET_OPS:
            last.append(memo.get(arg))
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            if not _global_ok(module, attr):
                raise ValueError(f"unsafe global {module}.{attr}")
            last.append(None)
        elif name == "STACK_GLOBAL":
            if len(last) < 2 or last[-1] is None or last[-2] is None:
                raise ValueError("STACK_GLOBAL with operands that cannot be checked")
            if not _global_ok(last[-2], last[-1]):
                raise ValueError(f"unsafe global {last[-2]}.{last[-1]}")
            last.append(None)
        elif name.startswith("EXT"):
            raise ValueError("pickle extension registry is not allowed")
        else:
            if name in ("LONG1", "LONG4", "BININT", "BININT1", "BININT2", "INT", "LONG") and not last:
                lone_int = arg
            last.append(None)
    return lone_int


def _scan_checkpoint(path: str) -> None:
    """Scan every pickle that ``torch.load`` would unpickle in ``path``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.endswith(".pkl"):
                    _scan_pickle(io.BytesIO(zf.read(member)))
        return
    with open(path, "rb") as fh:
        first = _scan_pickle(fh)
        if first == _LEGACY_MAGIC:  # protocol, sys_info, object, storage keys
            for _ in range(4):
                _scan_pickle(fh)


# --- loading ----------------------------------------------------------------

def _as_tensor_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {name}: not a non-empty mapping of tensors")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {name}: not a mapping of tensors ({len(bad)} bad entries, e.g. {', '.join(bad[:3])})"
        )
    state = {k: v.detach() for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` on CPU, never executing code."""
    path = os.fspath(path)
    name = os.path.basename(path) or path
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: file not found")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {name}: unreadable safetensors file ({_one_line(exc)})") from exc
        return _as_tensor_dict(obj, name)
    try:
        _scan_checkpoint(path)
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {name}: refused, unsafe or unreadable pickle ({_one_line(exc)})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # explicit: see module doc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {name}: refused by the weights-only loader ({_one_line(exc)})") from exc
    return _as_tensor_dict(obj, name)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex of a file, read in chunks so huge checkpoints cost no memory."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk_size), b""):
                h.update(block)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: cannot read ({exc.strerror or exc})") from exc
    return h.hexdigest()


def apply_state_dict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True, *, source: str | None = None
) -> None:
    """Copy ``state`` into ``module``; any mismatch is one clear CheckpointError line.

    Shape mismatches are always errors; missing and unexpected keys are errors
    when ``strict`` (otherwise only matching keys are loaded).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} (checkpoint {list(state[k].shape)} vs model {list(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(_listing("missing", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected", unexpected))
    if wrong:
        problems.append(_listing("wrong shape", wrong))
    if problems:
        label = f"checkpoint {source}" if source else "checkpoint"
        raise CheckpointError(f"{label} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)


def _listing(kind: str, names: list[str], show: int = 4) -> str:
    more = f", ... (+{len(names) - show})" if len(names) > show else ""
    return f"{len(names)} {kind} key(s): {', '.join(names[:show])}{more}"


def save_safetensors(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``module``'s weights as safetensors (contiguous CPU copies, no pickle)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, os.fspath(path))
