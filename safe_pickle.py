"""Loading torch.save files (.ckpt, .pt, .bin) without letting them run code.

A pickle is not data: it is a small program for a stack machine. Two of its instructions make it
dangerous. GLOBAL imports any name ("posix system", "io open", "subprocess Popen") and REDUCE calls
what is on the stack with arguments from the file. So `pickle.load` of a file whose object defines
`__reduce__ = lambda self: (os.system, ("rm -rf ~",))` runs that command, before you see any tensor.
torch.save writes pickles, and so does PyTorch Lightning, which wrote the official SD v1 .ckpt files.

The defence, from the Python docs ("Restricting Globals"), is to override `Unpickler.find_class`:
every GLOBAL goes through it, so an unknown name is refused before anything can call it. Here:
- the few torch functions that rebuild tensors and parameters are allowed;
- classes the official files carry but we never need (Lightning callbacks, OmegaConf configs, numpy
  scalars in the callback state, argparse hparams) become inert Placeholders: the file loads, and
  their own code never runs (their packages need not even be installed);
- anything else is an UnsafePickleError that names it.

torch.load's default `weights_only=True` does the same with its own fixed list, which refuses the
Lightning objects in sd-v1-4.ckpt and v1-5-pruned-emaonly.ckpt (diffusers issue #8874). We keep
torch's reader, which finds each tensor's bytes in the file, and hand it our Unpickler instead.

References: Python `pickle` docs; torch/serialization.py and torch/_weights_only_unpickler.py.
"""
import collections
import functools
import pickle
import types
import zipfile

import torch


class UnsafePickleError(Exception):
    """The file was refused: it names a global we do not allow, or it is not a torch.save file."""


# What rebuilds a tensor. torch.save writes each tensor as a call `_rebuild_tensor_v2(storage,
# offset, size, stride, ...)` whose storage is a "persistent id" that torch.load itself resolves
# to the bytes stored in the file; a state_dict() is an OrderedDict.
ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
}
# Storage classes name a dtype inside the persistent ids. torch.load maps them to a dtype before
# asking us; they are listed so that this unpickler is complete on its own.
for _kind in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
              "ComplexFloat", "ComplexDouble"):
    ALLOWED["torch", _kind + "Storage"] = getattr(torch, _kind + "Storage")
ALLOWED["torch.storage", "UntypedStorage"] = torch.UntypedStorage

# Known harmless passengers of official checkpoints, replaced by Placeholders.
INERT_PACKAGES = {"pytorch_lightning", "lightning", "lightning_fabric", "omegaconf"}
INERT_GLOBALS = {
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",  # numpy 1.x / 2.x names
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.dtype", "numpy.ndarray",
    "_codecs.encode",    # protocol 2 writes bytes (a numpy scalar's raw value) as encode(str, "latin1")
    "argparse.Namespace",  # hparams of older Lightning runs
}


class Placeholder:
    """Stands in for a class or function we refuse to run. Keeps nothing but `name`.

    Each pickled name gets its own subclass (see placeholder()), because pickle's NEWOBJ needs a
    class to instantiate. Every way a pickle fills an object in is a no-op: the call's arguments
    (REDUCE), the state (BUILD -> __setstate__), dict items (SETITEMS) and list items (APPENDS).
    """
    __slots__ = ()
    name = "?"

    def __init__(self, *args, **kwargs): pass
    def __setstate__(self, state): pass
    def __setitem__(self, key, value): pass  # dict subclasses, e.g. Lightning's AttributeDict
    def append(self, item): pass             # list subclasses
    def extend(self, items): pass
    def __repr__(self): return f"<placeholder {self.name}>"


@functools.cache  # one class per name, so e.g. two ModelCheckpoint objects share a type
def placeholder(name):
    return type(name.rsplit(".", 1)[-1], (Placeholder,), {"__slots__": (), "name": name})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        full = f"{module}.{name}"
        if module.split(".")[0] in INERT_PACKAGES or full in INERT_GLOBALS:
            return placeholder(full)
        # Never import `module`: importing alone can run code.
        raise UnsafePickleError(f"refused to unpickle the global {full} (a pickle can call any function "
                                "it names); convert the file with a tool you trust, or use a .safetensors file")


# torch.load asks its `pickle_module` for an Unpickler class (which it subclasses to resolve the
# storages) and, for the legacy format's header, for `load`. Nothing else.
_PICKLE_MODULE = types.SimpleNamespace(
    __name__="safe_pickle", Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load())


def load(path):
    """A torch.save file (zip since torch 1.6, or the legacy raw pickle) -> its object, on the CPU."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(4)
    mmap = False
    if head == b"PK\x03\x04":  # a zip: data.pkl plus one data/<key> record per storage
        try:
            with zipfile.ZipFile(path) as z:
                records = z.infolist()
        except zipfile.BadZipFile as e:
            raise UnsafePickleError(f"{path}: a damaged or truncated zip ({e}); download it again") from None
        names = [r.filename for r in records]
        if any(n.endswith("/constants.pkl") for n in names):  # torch.load would pass it to torch.jit.load
            raise UnsafePickleError(f"{path}: a TorchScript archive (code), not a checkpoint; refused")
        if not any(n.endswith("data.pkl") for n in names):
            raise UnsafePickleError(f"{path}: a zip without data.pkl, not a torch.save file")
        # Map the file instead of reading it (saves GBs of RAM), unless a record is compressed.
        mmap = all(r.compress_type == zipfile.ZIP_STORED for r in records)
    elif head[:1] != b"\x80":  # pickle's PROTO opcode; this also refuses the pre-2018 tar format
        raise UnsafePickleError(f"{path}: not a torch.save file (neither a zip nor a pickle)")
    try:
        # weights_only=False only lets torch use our pickle_module; find_class above does the vetting.
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE, mmap=mmap)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated or corrupt data: say so in one line, keep the cause chained
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsafePickleError(f"{path}: could not be read as a torch.save file ({first}); "
                                "is it truncated?") from e
