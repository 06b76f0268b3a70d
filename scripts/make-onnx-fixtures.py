#!/usr/bin/env python3
"""Builds the ONNX operator fixtures and reference outputs that fam's ONNX backbone is tested
against, using the onnx and onnxruntime Python packages (the Rust tests need neither).

    pip install onnx onnxruntime numpy
    python3 scripts/make-onnx-fixtures.py            # operator fixtures
    python3 scripts/make-onnx-fixtures.py --face models/fetched/mobilefacenet.onnx

Writes fam-plugins/onnx/tests/fixtures/ops/<case>.onnx with <case>.input.npy and
<case>.expected.npy, external/conv.{onnx,data} (weights as external data) with its input and
expected output, and (with --face) mobilefacenet.ref.{input,507,output}.npy.
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
    """One graph: input x (float32, shape of x, batch dim dynamic) -> y."""
    out_shape = out_shape or ["d%d" % i for i in range(4)]
    in_shape = ["N"] + list(x.shape[1:])
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset <= 18 else 9 if opset <= 20 else 10
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


# ---- operators added for the torchvision zoo (legacy exporter opset 13/17, dynamo opset 18) ----
I64 = lambda *v: np.array(v, dtype=np.int64)
F32 = lambda *v: np.array(v, dtype=np.float32)
x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)

# Element-wise, float
case("abs", [N("Abs", ["x"], ["y"])], x, None)
case("neg", [N("Neg", ["x"], ["y"])], x, None)
case("erf", [N("Erf", ["x"], ["y"])], x, None)
case("exp", [N("Exp", ["x"], ["y"])], x, None)
case("sqrt_of_abs", [N("Abs", ["x"], ["a"]), N("Sqrt", ["a"], ["y"])], x, None)
case("reciprocal", [N("Abs", ["x"], ["a"]), N("Add", ["a", "h"], ["b"]), N("Reciprocal", ["b"], ["y"])], x, None,
     inits=[("h", F32(0.5))])
case("log_of_abs", [N("Abs", ["x"], ["a"]), N("Add", ["a", "h"], ["b"]), N("Log", ["b"], ["y"])], x, None,
     inits=[("h", F32(0.1))])
case("floor_ceil", [N("Mul", ["x", "k"], ["a"]), N("Floor", ["a"], ["f"]), N("Ceil", ["a"], ["c"]),
                    N("Add", ["f", "c"], ["y"])], x, None, inits=[("k", F32(3.0))])
case("softplus", [N("Softplus", ["x"], ["y"])], x * 10, None)
case("mish_opset18", [N("Mish", ["x"], ["y"])], x * 5, None, opset=18)
case("elu", [N("Elu", ["x"], ["y"], alpha=0.7)], x, None)
case("gelu_opset20", [N("Gelu", ["x"], ["y"])], x * 3, None, opset=20)
case("gelu_tanh_opset20", [N("Gelu", ["x"], ["y"], approximate="tanh")], x * 3, None, opset=20)
# The legacy exporter's GELU (ConvNeXt): x * 0.5 * (1 + erf(x / sqrt 2))
case("gelu_erf_decomposed", [N("Div", ["x", "r2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
                              N("Mul", ["x", "p"], ["m"]), N("Mul", ["m", "half"], ["y"])], x, None,
     inits=[("r2", F32(1.4142135)), ("one", F32(1.0)), ("half", F32(0.5))])

# Pow: the exponents exports use, a negative base with an odd integer power, a tensor exponent
case("pow_square", [N("Pow", ["x", "e"], ["y"])], x, None, inits=[("e", F32(2.0))])
case("pow_cube_negative_base", [N("Pow", ["x", "e"], ["y"])], x, None, inits=[("e", F32(3.0))])
case("pow_fractional", [N("Abs", ["x"], ["a"]), N("Pow", ["a", "e"], ["y"])], x, None, inits=[("e", F32(1.7))])
case("pow_tensor_exponent", [N("Pow", ["x", "e"], ["y"])], x, None,
     inits=[("e", np.array([1.0, 2.0, 3.0, 4.0, 0.0], dtype=np.float32))])

# Normalisations
g5 = rng.standard_normal(5).astype(np.float32); b5 = rng.standard_normal(5).astype(np.float32)
case("layer_norm_last_axis_opset17", [N("LayerNormalization", ["x", "g", "b"], ["y"], epsilon=1e-6)], x, None,
     inits=[("g", g5), ("b", b5)], opset=17)
g345 = rng.standard_normal((3, 4, 5)).astype(np.float32)
case("layer_norm_axis1_no_bias_opset17", [N("LayerNormalization", ["x", "g"], ["y"], axis=1)], x, None,
     inits=[("g", g345)], opset=17)
g3 = rng.standard_normal(3).astype(np.float32); b3 = rng.standard_normal(3).astype(np.float32)
# ConvNeXt's LayerNorm2d: channels last, normalise, channels first
case("layer_norm2d_convnext_opset17", [N("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                                        N("LayerNormalization", ["t", "g", "b"], ["n"], epsilon=1e-6),
                                        N("Transpose", ["n"], ["y"], perm=[0, 3, 1, 2])], x, None,
     inits=[("g", g3), ("b", b3)], opset=17)
case("softmax_opset13", [N("Softmax", ["x"], ["y"])], x, None)
case("softmax_axis1_opset13", [N("Softmax", ["x"], ["y"], axis=1)], x, None)
case("softmax_coerced_opset11", [N("Softmax", ["x"], ["y"])], x, None, opset=11)
case("log_softmax_opset13", [N("LogSoftmax", ["x"], ["y"], axis=2)], x, None)
# F.normalize(x, dim=1) as the legacy exporter writes it
case("normalize_reduce_l2", [N("ReduceL2", ["x"], ["n"], axes=[1], keepdims=1), N("Clip", ["n", "eps"], ["c"]),
                              N("Shape", ["x"], ["s"]), N("Expand", ["c", "s"], ["e"]), N("Div", ["x", "e"], ["y"])],
     x, None, inits=[("eps", F32(1e-12))])

# Reductions (axes as attributes before opset 18, ReduceSum's as an input from 13)
case("reduce_sum_axes_input_opset13", [N("ReduceSum", ["x", "ax"], ["y"], keepdims=0)], x, ["N", 4],
     inits=[("ax", I64(1, -1))])
case("reduce_sum_attr_opset11", [N("ReduceSum", ["x"], ["y"], axes=[2], keepdims=1)], x, None, opset=11)
case("reduce_max_axes_input_opset18", [N("ReduceMax", ["x", "ax"], ["y"], keepdims=0)], x, ["N", 3],
     inits=[("ax", I64(2, 3))], opset=18)
case("reduce_max_attr_opset13", [N("ReduceMax", ["x"], ["y"], axes=[1])], x, None)
case("reduce_min_all_opset13", [N("ReduceMin", ["x"], ["y"], keepdims=1)], x, None)
case("reduce_l1_opset18", [N("ReduceL1", ["x", "ax"], ["y"])], x, None, inits=[("ax", I64(3))], opset=18)
case("reduce_sum_square_opset13", [N("ReduceSumSquare", ["x"], ["y"], axes=[0, 2])], x, None)
case("reduce_sum_noop_empty_axes_opset13", [N("ReduceSum", ["x", "ax"], ["y"], noop_with_empty_axes=1)], x, None,
     inits=[("ax", np.zeros((0,), dtype=np.int64))])

# Slice: inputs (opset 10+) with negative, clamped and INT_MAX values and steps; attributes (opset 9)
BIG = np.iinfo(np.int64).max
case("slice_inputs_opset13", [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], x, None,
     inits=[("st", I64(1, -4, 0)), ("en", I64(BIG, -1, 100)), ("ax", I64(1, 3, 2)), ("sp", I64(1, 2, 3))])
case("slice_negative_steps_opset13", [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], x, None,
     inits=[("st", I64(-1, BIG)), ("en", I64(-BIG, 0)), ("ax", I64(-1, 2)), ("sp", I64(-2, -1))])
case("slice_default_axes_opset13", [N("Slice", ["x", "st", "en"], ["y"])], x, None,
     inits=[("st", I64(0, 1)), ("en", I64(1, 3))])
case("slice_attributes_opset9", [N("Slice", ["x"], ["y"], starts=[1, -3], ends=[3, 1000], axes=[2, 3])], x, None, opset=9)
# GoogLeNet's transform_input: x[:, 0] * a + b, per channel, re-assembled
case("googlenet_transform_input", [
    N("Gather", ["x", "i0"], ["c0"], axis=1), N("Unsqueeze", ["c0", "ax1"], ["u0"]),
    N("Gather", ["x", "i1"], ["c1"], axis=1), N("Unsqueeze", ["c1", "ax1"], ["u1"]),
    N("Slice", ["x", "s2", "e2", "ax1"], ["u2"]),
    N("Mul", ["u0", "k"], ["m0"]), N("Add", ["m0", "k"], ["a0"]),
    N("Concat", ["a0", "u1", "u2"], ["y"], axis=1)], x, None,
    inits=[("i0", np.array(0, dtype=np.int64)), ("i1", np.array(1, dtype=np.int64)), ("ax1", I64(1)),
           ("s2", I64(2)), ("e2", I64(3)), ("k", F32(0.458))])

case("gather_2d_negative_indices", [N("Gather", ["x", "i"], ["y"], axis=3)], x, ["N", 3, 4, 2, 2],
     inits=[("i", np.array([[0, -1], [2, 1]], dtype=np.int64))])

# Split (split input from 13, attribute before, num_outputs from 18); the outputs are joined
# in another order so that each one is checked
case("split_input_opset13", [N("Split", ["x", "sp"], ["a", "b"], axis=1), N("Concat", ["b", "a"], ["y"], axis=1)],
     x, None, inits=[("sp", I64(1, 2))])
case("split_attribute_opset11", [N("Split", ["x"], ["a", "b"], axis=3, split=[2, 3]),
                                  N("Concat", ["b", "a"], ["y"], axis=3)], x, None, opset=11)
case("split_equal_opset13", [N("Split", ["x"], ["a", "b", "c"], axis=1), N("Concat", ["c", "a", "b"], ["y"], axis=1)],
     x, None)
case("split_num_outputs_uneven_opset18", [N("Split", ["x"], ["a", "b"], axis=3, num_outputs=2),
                                           N("Concat", ["b", "a"], ["y"], axis=3)], x, None, opset=18)
x4 = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
# ShuffleNet v2: chunk in two, branch, concat, channel shuffle (Reshape/Transpose/Reshape)
case("shufflenet_channel_shuffle", [
    N("Split", ["x", "sp"], ["a", "b"], axis=1), N("Relu", ["b"], ["rb"]), N("Concat", ["a", "rb"], ["c"], axis=1),
    N("Reshape", ["c", "s1"], ["r"]), N("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
    N("Reshape", ["t", "s2"], ["y"])], x4, None,
    inits=[("sp", I64(2, 2)), ("s1", I64(0, 2, 2, 3, 5)), ("s2", I64(0, -1, 3, 5))])
case("split_num_outputs_shufflenet_opset18", [
    N("Split", ["x"], ["a", "b"], axis=1, num_outputs=2), N("Concat", ["b", "a"], ["y"], axis=1)], x4, None, opset=18)

# Cast, comparisons, logic, Where
case("cast_int64_truncates", [N("Mul", ["x", "k"], ["m"]), N("Cast", ["m"], ["i"], to=TensorProto.INT64),
                              N("Cast", ["i"], ["y"], to=TensorProto.FLOAT)], x, None, inits=[("k", F32(3.0))])
case("cast_bool_int32_double", [N("Cast", ["x"], ["b"], to=TensorProto.BOOL), N("Cast", ["b"], ["i"], to=TensorProto.INT32),
                                N("Cast", ["x"], ["d"], to=TensorProto.DOUBLE), N("Cast", ["d"], ["f"], to=TensorProto.FLOAT),
                                N("Cast", ["i"], ["g"], to=TensorProto.FLOAT), N("Add", ["f", "g"], ["y"])], x, None)
case("cast_like_opset15", [N("Cast", ["x"], ["i"], to=TensorProto.INT64), N("CastLike", ["i", "x"], ["y"])], x * 4, None,
     opset=15)
case("where_greater", [N("Greater", ["x", "z"], ["c"]), N("Mul", ["x", "k"], ["s"]), N("Where", ["c", "x", "s"], ["y"])],
     x, None, inits=[("z", F32(0.0)), ("k", F32(0.1))])
case("where_broadcast_less", [N("Less", ["x", "t"], ["c"]), N("Where", ["c", "a", "x"], ["y"])], x, None,
     inits=[("t", rng.standard_normal((4, 1)).astype(np.float32)), ("a", F32(-7.0))])
case("equal_le_ge_logic", [
    N("Floor", ["x"], ["f"]), N("Equal", ["f", "z"], ["e"]), N("LessOrEqual", ["x", "h"], ["le"]),
    N("GreaterOrEqual", ["x", "mh"], ["ge"]), N("And", ["le", "ge"], ["band"]), N("Or", ["e", "band"], ["o"]),
    N("Not", ["o"], ["n"]), N("Xor", ["n", "e"], ["xo"]), N("Cast", ["xo"], ["y"], to=TensorProto.FLOAT)], x, None,
    inits=[("z", F32(0.0)), ("h", F32(0.5)), ("mh", F32(-0.5))])

# Shapes: Expand, Tile, ConstantOfShape, Range, Shape(start, end), Size
x1 = rng.standard_normal((2, 3, 1, 5)).astype(np.float32)
case("expand_opset13", [N("Expand", ["x", "s"], ["y"])], x1, None, inits=[("s", I64(3, 4, 1))])
case("expand_shape_of_opset13", [N("Shape", ["x"], ["s"]), N("Expand", ["b", "s"], ["e"]), N("Add", ["x", "e"], ["y"])], x,
     None, inits=[("b", rng.standard_normal((4, 1)).astype(np.float32))])
case("tile", [N("Tile", ["x", "r"], ["y"])], x1, None, inits=[("r", I64(1, 2, 3, 1))])
case("constant_of_shape_shape_start_opset15", [
    N("Shape", ["x"], ["s"], start=-2, end=4), N("ConstantOfShape", ["s"], ["c"], value=numpy_helper.from_array(F32(0.5))),
    N("Add", ["x", "c"], ["y"])], x, None, opset=15)
case("range_float_and_int", [
    N("Shape", ["x"], ["s"]), N("Gather", ["s", "i3"], ["w"]), N("Range", ["z", "w", "one"], ["r"]),
    N("Cast", ["r"], ["rf"], to=TensorProto.FLOAT), N("Range", ["fz", "fl", "fd"], ["q"]),
    N("Mul", ["rf", "q"], ["rq"]), N("Add", ["x", "rq"], ["y"])], x, None,
    inits=[("i3", np.array(3, dtype=np.int64)), ("z", np.array(0, dtype=np.int64)), ("one", np.array(1, dtype=np.int64)),
           ("fz", np.array(0.5, dtype=np.float32)), ("fl", np.array(1.75, dtype=np.float32)),
           ("fd", np.array(0.25, dtype=np.float32))])
case("size_neg_int", [N("Size", ["x"], ["n"]), N("Neg", ["n"], ["m"]), N("Abs", ["m"], ["a"]),
                      N("Cast", ["a"], ["f"], to=TensorProto.FLOAT), N("Div", ["x", "f"], ["y"])], x, None)
case("min_max_sum_mean_variadic", [
    N("Max", ["x", "a", "b"], ["mx"]), N("Min", ["x", "c"], ["mn"]), N("Sum", ["mx", "mn", "x"], ["s"]),
    N("Mean", ["s", "a"], ["y"])], x, None,
    inits=[("a", rng.standard_normal((5,)).astype(np.float32)), ("b", F32(-0.2)),
           ("c", rng.standard_normal((3, 1, 1)).astype(np.float32))])

# Resize: the modes torch exports (nearest: asymmetric + floor; bilinear: pytorch_half_pixel,
# align_corners, half_pixel), scales or sizes, up and down, and the older forms
def resize(name, x, opset=13, scales=None, sizes=None, **attrs):
    inits = [("roi", np.zeros((0,), dtype=np.float32))]
    names = ["x", "roi"]
    inits.append(("scales", np.array(scales if scales is not None else [], dtype=np.float32))); names.append("scales")
    if sizes is not None:
        inits.append(("sizes", np.array(sizes, dtype=np.int64))); names.append("sizes")
    case(name, [N("Resize", names, ["y"], **attrs)], x, None, inits=inits, opset=opset)
xr = rng.standard_normal((1, 2, 5, 7)).astype(np.float32)
resize("resize_nearest_asymmetric_floor", xr, scales=[1, 1, 2, 2], mode="nearest",
       coordinate_transformation_mode="asymmetric", nearest_mode="floor")
resize("resize_nearest_half_pixel_sizes", xr, sizes=[1, 2, 8, 12], mode="nearest")
resize("resize_nearest_round_prefer_ceil_down", xr, sizes=[1, 2, 3, 4], mode="nearest",
       coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")
resize("resize_nearest_ceil_align_corners", xr, scales=[1, 1, 1.5, 2.5], mode="nearest",
       coordinate_transformation_mode="align_corners", nearest_mode="ceil")
resize("resize_linear_pytorch_half_pixel", xr, scales=[1, 1, 2, 2], mode="linear",
       coordinate_transformation_mode="pytorch_half_pixel")
resize("resize_linear_pytorch_half_pixel_to_one", xr, sizes=[1, 2, 1, 3], mode="linear",
       coordinate_transformation_mode="pytorch_half_pixel")
resize("resize_linear_align_corners_sizes", xr, sizes=[1, 2, 9, 4], mode="linear",
       coordinate_transformation_mode="align_corners")
resize("resize_linear_half_pixel_down", xr, scales=[1, 1, 0.6, 0.5], mode="linear")
resize("resize_linear_asymmetric", xr, scales=[1, 1, 3, 1.5], mode="linear", coordinate_transformation_mode="asymmetric")
resize("resize_linear_half_pixel_symmetric_opset19", xr, sizes=[1, 2, 7, 10], mode="linear",
       coordinate_transformation_mode="half_pixel_symmetric", opset=19)
case("resize_axes_scales_opset18", [N("Resize", ["x", "", "scales"], ["y"], mode="linear", axes=[2, 3],
                                      coordinate_transformation_mode="pytorch_half_pixel")], xr, None,
     inits=[("scales", F32(2.0, 0.5))], opset=18)
case("resize_axes_sizes_not_larger_opset18", [N("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest", axes=[3, 2],
                                               keep_aspect_ratio_policy="not_larger")], xr, None,
     inits=[("sizes", I64(14, 20))], opset=18)
case("resize_scales_opset10", [N("Resize", ["x", "scales"], ["y"], mode="nearest")], xr, None,
     inits=[("scales", F32(1, 1, 2, 3))], opset=10)
case("resize_linear_opset10", [N("Resize", ["x", "scales"], ["y"], mode="linear")], xr, None,
     inits=[("scales", F32(1, 1, 2, 2))], opset=10)
case("upsample_nearest_opset9", [N("Upsample", ["x", "scales"], ["y"], mode="nearest")], xr, None,
     inits=[("scales", F32(1, 1, 2, 2))], opset=9)

# ---- external data: a small conv net whose weights live in `conv.data` beside the model ----
ext_dir = os.path.join(out, "external")
os.makedirs(ext_dir, exist_ok=True)
xe = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
ext_inits = [
    numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "body.0.weight"),
    numpy_helper.from_array(rng.standard_normal((4,)).astype(np.float32), "body.0.bias"),
    numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc.weight"),
    numpy_helper.from_array(rng.standard_normal((5,)).astype(np.float64), "fc.bias_f64"),
]
g = helper.make_graph(
    [N("Conv", ["x", "body.0.weight", "body.0.bias"], ["c"], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
     N("GlobalAveragePool", ["r"], ["p"]),
     # A Reshape target stays inline (a Constant), as exporters keep small shape tensors.
     N("Constant", [], ["flat_shape"], value=numpy_helper.from_array(np.array([0, -1], dtype=np.int64))),
     N("Reshape", ["p", "flat_shape"], ["f"]),
     N("Cast", ["fc.bias_f64"], ["fb"], to=TensorProto.FLOAT),
     N("Gemm", ["f", "fc.weight", "fb"], ["y"], transB=1)],
    "external_data",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
    initializer=ext_inits,
)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
m.ir_version = 8
onnx.checker.check_model(m)
y = run(m, xe)
for f in ("conv.onnx", "conv.data"):
    if os.path.exists(os.path.join(ext_dir, f)):
        os.remove(os.path.join(ext_dir, f))
# Every initializer goes to the data file (size_threshold 0), as the dynamo exporter writes them.
onnx.save_model(m, os.path.join(ext_dir, "conv.onnx"), save_as_external_data=True,
                all_tensors_to_one_file=True, location="conv.data", size_threshold=0)
os.chmod(os.path.join(ext_dir, "conv.data"), 0o644)
back = onnx.load(os.path.join(ext_dir, "conv.onnx"), load_external_data=False)
assert all(t.data_location == TensorProto.EXTERNAL for t in back.graph.initializer)
sess = ort.InferenceSession(os.path.join(ext_dir, "conv.onnx"), providers=["CPUExecutionProvider"])
assert np.allclose(sess.run(None, {"x": xe})[0], y, atol=1e-6)
np.save(os.path.join(ext_dir, "conv.input.npy"), xe)
np.save(os.path.join(ext_dir, "conv.expected.npy"), y.astype(np.float32))
print(f"external/conv: {xe.shape} -> {y.shape}, data file {os.path.getsize(os.path.join(ext_dir, 'conv.data'))} bytes")

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
