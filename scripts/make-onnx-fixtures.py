#!/usr/bin/env python3
"""Builds the ONNX operator fixtures and reference outputs that fam's ONNX backbone is tested
against, using the onnx and onnxruntime Python packages (the Rust tests need neither).

    pip install onnx onnxruntime numpy
    python3 scripts/make-onnx-fixtures.py            # operator fixtures
    python3 scripts/make-onnx-fixtures.py --face models/fetched/mobilefacenet.onnx

Writes fam-plugins/onnx/tests/fixtures/ops/<case>.onnx with <case>.input.npy and
<case>.expected.npy, and (with --face) mobilefacenet.ref.{input,507,output}.npy.
"""
import os, sys
import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper
import onnxruntime as ort

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
out = os.path.join(root, "fam-plugins", "onnx", "tests", "fixtures")
ops_dir = os.path.join(out, "ops")
os.makedirs(ops_dir, exist_ok=True)
rng = np.random.default_rng(20261126)

def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]

def case(name, nodes, x, out_shape, inits=(), opset=13):
    out_shape = out_shape or ["d%d" % i for i in range(4)]
    """One graph: input x (float32, shape of x, batch dim dynamic) -> y."""
    in_shape = ["N"] + list(x.shape[1:])
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    y = run(m, x)
    onnx.save(m, os.path.join(ops_dir, name + ".onnx"))
    np.save(os.path.join(ops_dir, name + ".input.npy"), x.astype(np.float32))
    np.save(os.path.join(ops_dir, name + ".expected.npy"), y.astype(np.float32))
    print(f"{name}: {x.shape} -> {y.shape}")

x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
N = helper.make_node
case("global_average_pool", [N("GlobalAveragePool", ["x"], ["y"])], x, None)
case("global_max_pool", [N("GlobalMaxPool", ["x"], ["y"])], x, None)
case("max_pool_pads", [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], x, None)
case("max_pool_ceil", [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)], x, None)
case("max_pool_ceil_pads", [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1)], x, None)
case("average_pool_pads", [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], x, None)
case("hard_sigmoid", [N("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)], x, None)
case("hard_swish", [N("HardSwish", ["x"], ["y"])], x, None, opset=14)
case("reduce_mean_axes_input", [N("ReduceMean", ["x", "axes"], ["y"], keepdims=1)], x, None,
     inits=[("axes", np.array([2, 3], dtype=np.int64))], opset=18)
case("reduce_mean_axes_attr", [N("ReduceMean", ["x"], ["y"], axes=[-1], keepdims=0)], x, ["N", "C", "H"], opset=13)
w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
b = rng.standard_normal((4,)).astype(np.float32)
case("conv_same_upper", [N("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])], x, None,
     inits=[("w", w), ("b", b)])
case("conv_asymmetric_pads", [N("Conv", ["x", "w"], ["y"], pads=[0, 1, 1, 0])], x, None, inits=[("w", w)])
wd = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
case("conv_depthwise", [N("Conv", ["x", "w"], ["y"], group=3, pads=[1, 1, 1, 1], strides=[2, 2])], x, None, inits=[("w", wd)])
case("pad_constant", [N("Pad", ["x", "pads", "v"], ["y"], mode="constant")], x, None,
     inits=[("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64)), ("v", np.array(0.5, dtype=np.float32))])
gw = rng.standard_normal((5, 3 * 9 * 11)).astype(np.float32)
gb = rng.standard_normal((5,)).astype(np.float32)
case("flatten_gemm", [N("Flatten", ["x"], ["f"], axis=1), N("Gemm", ["f", "gw", "gb"], ["y"], transB=1, alpha=0.5, beta=2.0)],
     x, ["N", 5], inits=[("gw", gw), ("gb", gb)])
case("clip_attributes_opset6", [N("Clip", ["x"], ["y"], min=-0.5, max=0.7)], x, None, opset=6)
case("clip_inputs_opset13", [N("Clip", ["x", "lo", "hi"], ["y"])], x, None,
     inits=[("lo", np.array(-0.25, dtype=np.float32)), ("hi", np.array(0.9, dtype=np.float32))])
slope = rng.standard_normal((3, 1, 1)).astype(np.float32)
case("prelu", [N("PRelu", ["x", "s"], ["y"])], x, None, inits=[("s", slope)])
case("batch_norm", [N("BatchNormalization", ["x", "g", "bb", "m", "v"], ["y"], epsilon=1e-3)], x, None,
     inits=[("g", rng.standard_normal(3).astype(np.float32)), ("bb", rng.standard_normal(3).astype(np.float32)),
            ("m", rng.standard_normal(3).astype(np.float32)), ("v", rng.random(3).astype(np.float32) + 0.5)])

if "--face" in sys.argv:
    path = sys.argv[sys.argv.index("--face") + 1]
    m = onnx.load(path)
    m.graph.output.append(helper.make_tensor_value_info("507", TensorProto.FLOAT, [1, 512, 7, 7]))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    # The export fixes the batch at 1: run images one by one.
    xs = rng.uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    outs = [sess.run(["507", "output"], {"input": xs[i:i + 1]}) for i in range(2)]
    np.save(os.path.join(out, "mobilefacenet.ref.input.npy"), xs)
    np.save(os.path.join(out, "mobilefacenet.ref.507.npy"), np.concatenate([o[0] for o in outs]))
    np.save(os.path.join(out, "mobilefacenet.ref.output.npy"), np.concatenate([o[1] for o in outs]))
    print("mobilefacenet reference written")
