#!/usr/bin/env python3
"""Reference outputs for fam's ResNets: narrow ResNet-18 (BasicBlock) and ResNet-50-style
(Bottleneck) networks with random weights under torchvision's parameter names, evaluated by
onnxruntime on a graph built independently of fam's code.

    pip install onnx onnxruntime numpy
    python3 scripts/make-resnet-fixtures.py

Writes fam-plugins/fewshot/tests/fixtures/{resnet_basic,resnet_bottleneck,resnet12}.{safetensors,
input.npy,layer4.npy}.
"""
import json, os, struct
import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper
import onnxruntime as ort

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fam-plugins", "fewshot", "tests", "fixtures")
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(18)

def save_safetensors(tensors, path):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dt = {np.float32: "F32", np.int64: "I64"}[a.dtype.type]
        b = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for b in blobs: f.write(b)

class Net:
    def __init__(self):
        self.nodes, self.inits, self.sd, self.n = [], [], {}, 0
    def fresh(self):
        self.n += 1; return f"v{self.n}"
    def conv_bn(self, x, name, cin, cout, k, stride, relu):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        g = (1 + 0.1 * rng.standard_normal(cout)).astype(np.float32)
        b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        m = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        v = (1 + 0.2 * rng.random(cout)).astype(np.float32)
        conv, bn = name
        self.sd[f"{conv}.weight"] = w
        for k2, a in [("weight", g), ("bias", b), ("running_mean", m), ("running_var", v)]:
            self.sd[f"{bn}.{k2}"] = a
        self.sd[f"{bn}.num_batches_tracked"] = np.array(0, dtype=np.int64)
        names = [f"{conv}.weight", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"]
        for nm in names: self.inits.append(numpy_helper.from_array(self.sd[nm], nm))
        c, y = self.fresh(), self.fresh()
        self.nodes.append(helper.make_node("Conv", [x, names[0]], [c], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        self.nodes.append(helper.make_node("BatchNormalization", [c] + names[1:], [y], epsilon=1e-5))
        if relu:
            r = self.fresh(); self.nodes.append(helper.make_node("Relu", [y], [r])); return r
        return y
    def leaky(self, x):
        r = self.fresh(); self.nodes.append(helper.make_node("LeakyRelu", [x], [r], alpha=0.1)); return r
    def add_relu(self, a, b):
        s, r = self.fresh(), self.fresh()
        self.nodes.append(helper.make_node("Add", [a, b], [s])); self.nodes.append(helper.make_node("Relu", [s], [r]))
        return r

def build(kind, widths, blocks, expansion):
    net = Net()
    x = net.conv_bn("x", ("conv1", "bn1"), 3, widths[0], 7, 2, True)
    p = net.fresh()
    net.nodes.append(helper.make_node("MaxPool", [x], [p], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = p, widths[0]
    for li, (w, n) in enumerate(zip(widths, blocks)):
        for bi in range(n):
            stride = 2 if (li > 0 and bi == 0) else 1
            pre = f"layer{li + 1}.{bi}"
            cout = w * expansion
            if kind == "basic":
                h = net.conv_bn(x, (f"{pre}.conv1", f"{pre}.bn1"), cin, w, 3, stride, True)
                h = net.conv_bn(h, (f"{pre}.conv2", f"{pre}.bn2"), w, w, 3, 1, False)
            else:
                h = net.conv_bn(x, (f"{pre}.conv1", f"{pre}.bn1"), cin, w, 1, 1, True)
                h = net.conv_bn(h, (f"{pre}.conv2", f"{pre}.bn2"), w, w, 3, stride, True)
                h = net.conv_bn(h, (f"{pre}.conv3", f"{pre}.bn3"), w, cout, 1, 1, False)
            if stride != 1 or cin != cout:
                sc = net.conv_bn(x, (f"{pre}.downsample.0", f"{pre}.downsample.1"), cin, cout, 1, stride, False)
            else:
                sc = x
            x, cin = net.add_relu(h, sc), cout
    g = helper.make_graph(net.nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializer=net.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); m.ir_version = 8
    inp = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": inp})[0]
    # A classifier head, present in real checkpoints and ignored by the backbone.
    net.sd["fc.weight"] = rng.standard_normal((10, cin)).astype(np.float32)
    net.sd["fc.bias"] = np.zeros(10, np.float32)
    name = f"resnet_{kind}"
    save_safetensors(net.sd, os.path.join(out, name + ".safetensors"))
    np.save(os.path.join(out, name + ".input.npy"), inp)
    np.save(os.path.join(out, name + ".layer4.npy"), y)
    print(name, y.shape, len(net.sd), "tensors")

def build_resnet12(widths):
    net = Net()
    x, cin = "x", 3
    for li, w in enumerate(widths):
        pre = f"layer{li + 1}.0"
        h = net.leaky(net.conv_bn(x, (f"{pre}.conv1", f"{pre}.bn1"), cin, w, 3, 1, False))
        h = net.leaky(net.conv_bn(h, (f"{pre}.conv2", f"{pre}.bn2"), w, w, 3, 1, False))
        h = net.conv_bn(h, (f"{pre}.conv3", f"{pre}.bn3"), w, w, 3, 1, False)
        sc = net.conv_bn(x, (f"{pre}.downsample.0", f"{pre}.downsample.1"), cin, w, 1, 1, False)
        s, p = net.fresh(), net.fresh()
        net.nodes.append(helper.make_node("Add", [h, sc], [s]))
        net.nodes.append(helper.make_node("MaxPool", [net.leaky(s)], [p], kernel_shape=[2, 2], strides=[2, 2]))
        x, cin = p, w
    g = helper.make_graph(net.nodes, "resnet12", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializer=net.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); m.ir_version = 8
    inp = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": inp})[0]
    save_safetensors(net.sd, os.path.join(out, "resnet12.safetensors"))
    np.save(os.path.join(out, "resnet12.input.npy"), inp)
    np.save(os.path.join(out, "resnet12.layer4.npy"), y)
    print("resnet12", y.shape, len(net.sd), "tensors")

build("basic", [4, 8, 16, 32], [2, 2, 2, 2], 1)       # ResNet-18 layout, narrow
build("bottleneck", [4, 8, 8, 16], [2, 1, 2, 1], 4)   # ResNet-50 layout (Bottleneck, stride on conv2), narrow and short
build_resnet12([4, 8, 12, 16])                         # few-shot ResNet-12, narrow
