#!/usr/bin/env python3
"""Writes tiny PyTorch checkpoints in the zip and legacy formats, without PyTorch.

The files reproduce what `torch.save(state_dict)` writes (pickle protocol 2, storages as
persistent ids, `torch._utils._rebuild_tensor_v2`), so fam's readers can be tested on
both formats. Output: fam-plugins/weights/tests/fixtures/tiny_{zip,legacy}.pth

    python3 scripts/make-pth-fixtures.py
"""
import collections, io, pickle, struct, sys, types, zipfile, os

# Stand-ins for the torch globals a state dict references; pickled by module and name.
torch = types.ModuleType("torch"); torch_utils = types.ModuleType("torch._utils")
sys.modules["torch"] = torch; sys.modules["torch._utils"] = torch_utils
class FloatStorage: pass
class LongStorage: pass
FloatStorage.__module__ = LongStorage.__module__ = "torch"
torch.FloatStorage, torch.LongStorage = FloatStorage, LongStorage
def _rebuild_tensor_v2(*a): raise RuntimeError("never called")
_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2

class Storage:
    def __init__(self, key, cls, fmt, values):
        self.key, self.cls, self.fmt, self.values = key, cls, fmt, values
    def raw(self):
        return struct.pack("<%d%s" % (len(self.values), self.fmt), *self.values)

class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)

# w: 2x3 floats (contiguous); wt: its transpose as a strided view of the same storage;
# b: 3 floats at offset 6 of the same storage; n: an int64 scalar.
s0 = Storage("0", FloatStorage, "f", [0.5, -1.0, 2.0, 3.25, 4.0, -5.5, 7.0, 8.0, 9.0])
s1 = Storage("1", LongStorage, "q", [42])
sd = collections.OrderedDict()
sd["layer.w"] = Tensor(s0, 0, (2, 3), (3, 1))
sd["layer.wt"] = Tensor(s0, 0, (3, 2), (1, 3))
sd["layer.b"] = Tensor(s0, 6, (3,), (1,))
sd["layer.n"] = Tensor(s1, 0, (), ())

class P(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", len(obj.values))
        return None

def dump(obj, f):
    P(f, protocol=2).dump(obj)

out = os.path.join(os.path.dirname(__file__), "..", "fam-core", "tests", "fixtures")
os.makedirs(out, exist_ok=True)

buf = io.BytesIO(); dump(sd, buf)
with zipfile.ZipFile(os.path.join(out, "tiny_zip.pth"), "w", zipfile.ZIP_STORED) as z:
    z.writestr("tiny_zip/data.pkl", buf.getvalue())
    z.writestr("tiny_zip/byteorder", "little")
    z.writestr("tiny_zip/data/0", s0.raw())
    z.writestr("tiny_zip/data/1", s1.raw())
    z.writestr("tiny_zip/version", "3\n")

with open(os.path.join(out, "tiny_legacy.pth"), "wb") as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    dump(sd, f)
    pickle.dump(["0", "1"], f, protocol=2)
    for s in (s0, s1):
        f.write(struct.pack("<q", len(s.values)))
        f.write(s.raw())
print("wrote", out)
