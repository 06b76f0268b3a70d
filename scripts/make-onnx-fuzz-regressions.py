#!/usr/bin/env python3
"""Writes the ONNX inputs that crashed or could crash the `onnx` plugin (found by
`fam-plugins/onnx/examples/fuzz_onnx.rs`, or by reading the code it pointed at) to
`fuzz/crashes/onnx-crash-<what>`. `fam-plugins/onnx/tests/fuzz_corpus.rs` replays them.

Needs the `onnx` Python package (pip install onnx)."""
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "crashes"


def model(nodes, inits=(), outputs=("y",), shape=(1, 3, 8, 8)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    g = helper.make_graph(nodes, "g", [x], outs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    return m.SerializeToString()


def t(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


cases = {
    # Found by the fuzzer: a graph without outputs indexed `outputs[0]`.
    "no-graph-output": model([helper.make_node("Relu", ["x"], ["y"])], outputs=()),
    # Found by the fuzzer's first run: Pad asking for ~2e16 bytes aborted the process.
    "pad-huge": model(
        [helper.make_node("Pad", ["x", "p"], ["y"])],
        [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1 << 40, 1 << 40], np.int64), "p")],
    ),
    # Clip with an empty `min` tensor indexed element 0.
    "clip-empty-min": model([helper.make_node("Clip", ["x", "lo"], ["y"])], [t("lo", np.zeros((0,)))]),
    # Convolution attributes that could divide by zero or ask for huge padding.
    "conv-stride-0": model(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[0, 0])], [t("w", np.ones((4, 3, 3, 3)))]
    ),
    "conv-pads-huge": model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1 << 30] * 4)], [t("w", np.ones((4, 3, 3, 3)))]
    ),
    "conv-kernel-larger-than-input": model(
        [helper.make_node("Conv", ["x", "w"], ["y"])], [t("w", np.ones((4, 3, 9, 9)))]
    ),
    "conv-negative-dilation": model(
        [helper.make_node("Conv", ["x", "w"], ["y"], dilations=[-1, -1])], [t("w", np.ones((4, 3, 3, 3)))]
    ),
    "maxpool-kernel-0": model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[0, 0])]),
    "avgpool-stride-negative": model(
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[-3, -3])]
    ),
    "input-declares-huge-size": model([helper.make_node("Relu", ["x"], ["y"])], shape=(1, 3, 1 << 20, 1 << 20)),
}

OUT.mkdir(parents=True, exist_ok=True)
for name, data in cases.items():
    (OUT / f"onnx-crash-{name}").write_bytes(data)
    print(f"onnx-crash-{name}: {len(data)} bytes")
