"""safe_pickle.py: official-style Lightning checkpoints load with identical tensors, while pickles
that would run code are refused before any of it runs (the payloads are first shown to be live)."""
import argparse
import os
import pickle
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import safe_pickle
from safe_pickle import Placeholder, UnsafePickleError

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}


@contextmanager
def fake_lightning():
    """Modules that exist only while torch.save pickles objects of their classes, as in a training
    run; the loader then truly has no pytorch_lightning / omegaconf to import."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
             "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing", "omegaconf", "omegaconf.dictconfig"]
    assert not any(n in sys.modules for n in names)
    mods = {n: types.ModuleType(n) for n in names}

    def cls(module, name, bases=(), **body):
        c = type(name, bases, {"__module__": module, "__qualname__": name, **body})
        setattr(mods[module], name, c)
        return c

    classes = types.SimpleNamespace(
        ModelCheckpoint=cls("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        AttributeDict=cls("pytorch_lightning.utilities.parsing", "AttributeDict", (dict,)),  # filled by SETITEMS
        DictConfig=cls("omegaconf.dictconfig", "DictConfig", __getstate__=lambda self: {"_content": {"lr": 1e-4}}))
    sys.modules.update(mods)
    try:
        yield classes
    finally:
        for n in names:
            del sys.modules[n]


def small_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=g).half(),
        "first_stage_model.quant_conv.weight": torch.randn(8, 8, 1, 1, generator=g).bfloat16(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_checkpoint_loads_with_inert_placeholders(tmp_path, fmt):
    sd = small_state_dict()
    path = tmp_path / "sd-v1-x.ckpt"
    with fake_lightning() as L:
        callback = L.ModelCheckpoint()
        callback.dirpath, callback.monitor = "/logs/checkpoints", "val/loss_simple_ema"
        torch.save({
            "state_dict": sd,
            "callbacks": {callback: {"best_model_score": torch.tensor(0.125), "best_k_models": {}},
                          L.ModelCheckpoint: {"dirpath": "/logs"}},  # Lightning 1.4 keyed by the class
            "global_step": 470000, "epoch": 6, "pytorch-lightning_version": "1.4.2",
            "best_score": np.float64(0.25),
            "hyper_parameters": L.AttributeDict(lr=1e-4), "hparams": argparse.Namespace(lr=1e-4),
            "config": L.DictConfig(),
        }, path, **FORMATS[fmt])
    assert "pytorch_lightning" not in sys.modules

    ckpt = safe_pickle.load(path)
    assert "pytorch_lightning" not in sys.modules and "omegaconf" not in sys.modules  # nothing was imported
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["pytorch-lightning_version"]) == (470000, 6, "1.4.2")
    assert ckpt["state_dict"].keys() == sd.keys()
    for k, v in sd.items():
        assert ckpt["state_dict"][k].dtype == v.dtype and torch.equal(ckpt["state_dict"][k], v), k

    (inst, state), (klass, _) = ckpt["callbacks"].items()
    name = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert isinstance(inst, Placeholder) and type(inst).name == name and type(inst) is klass
    assert issubclass(klass, Placeholder) and klass.name == name
    assert torch.equal(state["best_model_score"], torch.tensor(0.125))  # plain data inside stays
    # Inert: the instance kept none of its state, and the dict subclass none of its items.
    assert not hasattr(inst, "__dict__") and not hasattr(inst, "dirpath")
    assert type(ckpt["hyper_parameters"]).name == "pytorch_lightning.utilities.parsing.AttributeDict"
    assert not hasattr(ckpt["hparams"], "lr") and type(ckpt["hparams"]).name == "argparse.Namespace"
    assert type(ckpt["config"]).name == "omegaconf.dictconfig.DictConfig"
    assert type(ckpt["best_score"]).name in ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    assert repr(inst) == f"<placeholder {name}>"


class OpenMarker:  # unpickling calls open(path, "w"): creates the file
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, "w"))


class SystemMarker:  # unpickling runs a shell command
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (os.system, (f"touch {self.path}",))


PAYLOADS = [(OpenMarker, "io.open"), (SystemMarker, f"{os.system.__module__}.system")]  # posix.system


@pytest.mark.parametrize("payload,global_name", PAYLOADS)
def test_payloads_are_live_with_plain_pickle(tmp_path, payload, global_name):
    """The attack is real: an unrestricted unpickler runs it. (Why the next tests matter.)"""
    marker = tmp_path / "marker"
    raw = pickle.dumps({"x": payload(marker)}, protocol=2)
    module, name = global_name.rsplit(".", 1)
    assert f"c{module}\n{name}\n".encode() in raw  # a GLOBAL opcode: the pickle names what it will call
    out = pickle.loads(raw)
    if hasattr(out["x"], "close"):
        out["x"].close()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw pickle"])
@pytest.mark.parametrize("payload,global_name", PAYLOADS)
def test_code_running_pickles_are_refused(tmp_path, payload, global_name, fmt):
    marker = tmp_path / "marker"
    obj = {"state_dict": small_state_dict(), "callbacks": {"evil": payload(marker)}}
    path = tmp_path / "evil.bin"
    if fmt == "raw pickle":  # not torch.save: plain pickle of tensors calls torch.load inside, refused too
        path.write_bytes(pickle.dumps(obj["state_dict"], protocol=2))
        with pytest.raises(UnsafePickleError, match=r"global torch\.storage\._load_from_bytes "):
            safe_pickle.load(path)
        path.write_bytes(pickle.dumps(obj["callbacks"], protocol=2))
    else:
        torch.save(obj, path, **FORMATS[fmt])
    with pytest.raises(UnsafePickleError) as e:
        safe_pickle.load(path)
    msg = str(e.value)
    assert "\n" not in msg and f"global {global_name} " in msg and ".safetensors" in msg and str(path) in msg
    assert not marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    """torch.save(model) pickles the class by name: loading it would import and run model code."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(UnsafePickleError, match=r"global torch\.nn\.modules\.linear\.Linear "):
        safe_pickle.load(tmp_path / "model.pt")


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_shared_storage_and_parameters(tmp_path, fmt):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g)
    p = torch.nn.Parameter(torch.randn(5, generator=g))
    q = torch.nn.Parameter(torch.randn(2, generator=g).half(), requires_grad=False)
    q.ema_note = "has python state"  # saved through _rebuild_parameter_with_state
    obj = {"base": base, "row": base[1], "t": base.t(), "tail": base.view(-1)[5:], "p": p, "q": q}
    torch.save(obj, tmp_path / "views.pt", **FORMATS[fmt])

    out = safe_pickle.load(tmp_path / "views.pt")
    for k, v in obj.items():
        assert torch.equal(out[k], v) and out[k].dtype == v.dtype, k
        assert out[k].stride() == v.stride() and out[k].storage_offset() == v.storage_offset(), k
    ptr = out["base"].untyped_storage().data_ptr()
    assert all(out[k].untyped_storage().data_ptr() == ptr for k in ("row", "t", "tail"))
    out["base"][1, 2] = 100.0  # one storage: the views see the write
    assert out["row"][2] == 100.0 and out["t"][2, 1] == 100.0 and out["tail"][1] == 100.0
    assert isinstance(out["p"], torch.Tensor) and out["p"].requires_grad
    assert isinstance(out["q"], torch.Tensor) and not out["q"].requires_grad and out["q"].ema_note == "has python state"


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_is_one_line_error(tmp_path, fmt):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": small_state_dict()}, good, **FORMATS[fmt])
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 10):
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(UnsafePickleError) as e:
            safe_pickle.load(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value), str(e.value)


@pytest.mark.parametrize("content", [b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", b"", b"PK"])
def test_not_a_torch_file_is_one_line_error(tmp_path, content):
    path = tmp_path / "model.ckpt"  # e.g. a Git LFS pointer instead of the weights
    path.write_bytes(content)
    with pytest.raises(UnsafePickleError, match="not a torch.save file") as e:
        safe_pickle.load(path)
    assert "\n" not in str(e.value)


def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(UnsafePickleError, match="TorchScript"):
        safe_pickle.load(tmp_path / "scripted.pt")


# -----------------------------------------------------------------------------------------------
# Other ways to name and call a global: protocol 0's INST, protocols 4/5's STACK_GLOBAL, and a
# payload hidden inside an inert class's arguments or its BUILD state.

def test_protocol_0_inst_is_refused(tmp_path):
    marker = tmp_path / "marker"
    raw = f"(S'touch {marker}'\nios\nsystem\n.".encode()  # MARK, a string, INST os.system: calls it
    pickle.loads(raw)                                       # live with plain pickle...
    assert marker.exists()
    marker.unlink()
    import io
    with pytest.raises(UnsafePickleError, match=r"global os\.system "):
        safe_pickle.RestrictedUnpickler(io.BytesIO(raw)).load()
    (tmp_path / "p0.pkl").write_bytes(raw)                  # ...and no torch.save file starts that way
    with pytest.raises(UnsafePickleError, match="not a torch.save file"):
        safe_pickle.load(tmp_path / "p0.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("payload,global_name", PAYLOADS)
def test_stack_global_is_refused(tmp_path, protocol, payload, global_name):
    marker = tmp_path / "marker"
    raw = pickle.dumps({"x": payload(marker)}, protocol=protocol)
    assert pickle.STACK_GLOBAL in raw and b"\x8c" in raw  # the name is pushed as strings, then looked up
    out = pickle.loads(raw)
    if hasattr(out["x"], "close"):
        out["x"].close()
    assert marker.exists()
    marker.unlink()
    (tmp_path / "raw.pkl").write_bytes(raw)
    torch.save({"state_dict": small_state_dict(), "evil": payload(marker)}, tmp_path / "evil.ckpt",
               pickle_protocol=protocol)
    for path in (tmp_path / "raw.pkl", tmp_path / "evil.ckpt"):
        with pytest.raises(UnsafePickleError, match=f"global {global_name} "):
            safe_pickle.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["arguments", "state"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_inside_an_inert_class_is_refused(tmp_path, where, fmt):
    """An allowed placeholder (omegaconf's DictConfig) must not let the objects it is built from
    run: its arguments (REDUCE) and its state (BUILD) are unpickled first, through find_class."""
    marker = tmp_path / "marker"
    with fake_lightning() as lightning:
        DictConfig = lightning.DictConfig
        if where == "arguments":
            DictConfig.__reduce__ = lambda self: (DictConfig, (SystemMarker(marker),))
        else:
            DictConfig.__getstate__ = lambda self: {"_content": SystemMarker(marker)}
        obj = {"state_dict": small_state_dict(), "config": DictConfig()}
        raw = pickle.dumps(obj["config"], protocol=2)
        torch.save(obj, tmp_path / "evil.ckpt", **FORMATS[fmt])
    assert b"omegaconf.dictconfig\nDictConfig" in raw and b"system" in raw
    with pytest.raises(UnsafePickleError, match=rf"global {os.system.__module__}\.system "):
        safe_pickle.load(tmp_path / "evil.ckpt")
    assert not marker.exists()
