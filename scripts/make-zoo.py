#!/usr/bin/env python3
"""Builds fam's ONNX model zoo: torchvision CNNs (random weights) exported as feature extractors
by both of torch's ONNX exporters, each with an onnxruntime reference, and a manifest.

    PY=$(scripts/zoo-env.sh | tail -n1)        # the pinned virtualenv (.cache/zoo-venv)
    $PY scripts/make-zoo.py                    # the full zoo, 224 px, into models/zoo/
    $PY scripts/make-zoo.py --subset ci        # the test suite's set, 64 px, into models/zoo/ci/
    $PY scripts/make-zoo.py --models resnet18,googlenet --variants legacy17,dynamo_ext
    $PY scripts/make-zoo.py --list             # the architectures and subsets

Every model is a wrapper whose forward returns two outputs: `features`, the last convolutional
feature map [B, C, h, w], and `embedding`, [B, D]: its global average pool ("gap" head) or, for
the two face/re-id nets written here, the output of an affine head after the feature map
("affine" head; mobilefacenet: 7x7 depthwise "GDConv", BatchNorm2d, Linear, BatchNorm1d, at
112 px whatever --size says; reid_resnet18: GAP, Linear(512, 256), BatchNorm1d). Weights are
random (torch.manual_seed(0) for each model); BatchNorm running statistics are set from seeded
random images and their affine parameters drawn, so no BatchNorm is the identity. The input
is named `input`. The `*_slim` architectures are small configurations of torchvision's own
classes (ConvNeXt, ResNet with groups, DenseNet, Inception v3 blocks) for the CI subset.

Variants of each model (file `<model>.<variant>.onnx`):
  legacy13       torch.onnx.export(dynamo=False), opset 13, weights inline
  legacy17       the same at opset 17
  dynamo_ext     torch.onnx.export(dynamo=True) at its default opset (20 with torch 2.15),
                 weights in the `<file>.data` file next to it (external data)
  dynamo_inline  the dynamo_ext model re-saved with its weights inline (onnx.save)
The batch dimension is dynamic (named "batch") where the exporter manages it; the manifest's
`dynamic_batch` says whether it is, and `dynamic_batch_note` why not. A dynamic batch is
checked by running onnxruntime at batch 1 as well.

Next to each file: `<name>.input.npy` (seeded random input [2, 3, S, S] float32) and
`<name>.features.npy`, `<name>.embedding.npy` (onnxruntime's outputs, CPUExecutionProvider),
checked against PyTorch (a relative difference over 1e-3 of the output's largest value fails
the variant). DIR/zoo.json lists every entry (keys: ENTRY_KEYS below; `op_types` is the set
of ONNX operator types in the file, and `op_types_by_exporter` their union). A variant that
fails is listed with an `error` and the others go on; the exit code is then 1. The files are
deterministic (the same bytes on every run) and the script idempotent: a variant whose files
exist is not exported again (its manifest entry is kept) unless --force, or unless the
manifest is of another ZOO_VERSION (bump it when a change here changes the files).
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
import zlib

import numpy as np
import torch
import torch.nn as nn
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["legacy13", "legacy17", "dynamo_ext", "dynamo_inline"]
ENTRY_KEYS = [
    "name", "arch", "variant", "exporter", "opset", "external_data", "file", "data_file",
    "input", "size", "features", "embedding", "head", "feature_shape", "embedding_dim",
    "dynamic_batch", "dynamic_batch_note", "ref_input", "ref_features", "ref_embedding",
    "export_seconds", "file_bytes", "sha256", "op_types", "ort_vs_torch_max_abs", "ort_vs_torch_max_rel",
    "error",
]
INPUT, FEATURES, EMBEDDING = "input", "features", "embedding"
# Bump when a change here changes the files: a manifest of another version is exported again.
ZOO_VERSION = 2


# ---------------------------------------------------------------------------------------
# Models: a trunk (input -> last feature map) and a head (feature map -> embedding).

class FeatureExtractor(nn.Module):
    """forward(x) -> (features [B, C, h, w], embedding [B, D])."""

    def __init__(self, trunk, head=None):
        super().__init__()
        self.trunk = trunk
        self.head = head if head is not None else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    def forward(self, x):
        f = self.trunk(x)
        return f, self.head(f)


def seq(m, names):
    return nn.Sequential(*[getattr(m, n) for n in names])


def resnet_trunk(m):
    return seq(m, ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"])


def tv(name, **kw):
    return getattr(torchvision.models, name)(weights=None, **kw)


def conv_bn_prelu(cin, cout, k, s, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.PReLU(cout))


class FaceBlock(nn.Module):
    """MobileFaceNet's bottleneck: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ x)."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            conv_bn_prelu(cin, mid, 1, 1), conv_bn_prelu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def mobilefacenet_like(size):
    """MobileFaceNet-style: stride 16 trunk (112 px -> 7x7 map) and its GDConv head."""
    trunk = nn.Sequential(
        conv_bn_prelu(3, 32, 3, 2),                      # 56
        conv_bn_prelu(32, 32, 3, 1, groups=32),          # depthwise
        FaceBlock(32, 48, 2, 2),                         # 28
        FaceBlock(48, 48, 1, 2),
        FaceBlock(48, 64, 2, 2),                         # 14
        FaceBlock(64, 64, 1, 2),
        FaceBlock(64, 96, 2, 2),                         # 7
        FaceBlock(96, 96, 1, 2),
        conv_bn_prelu(96, 256, 1, 1),                    # the last feature map, 256 x 7 x 7
    )
    side = -(-size // 16)
    head = nn.Sequential(
        nn.Conv2d(256, 256, side, groups=256, bias=False),   # GDConv: covers the whole map
        nn.BatchNorm2d(256),
        nn.Flatten(1),
        nn.Linear(256, 128),
        nn.BatchNorm1d(128),
    )
    return FeatureExtractor(trunk, head)


def reid_resnet18(size):
    trunk = resnet_trunk(tv("resnet18"))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512, 256), nn.BatchNorm1d(256))
    return FeatureExtractor(trunk, head)


def slim(builder):
    """Small configurations of the large architectures (same operators, few weights), for CI."""
    def make(size):
        return FeatureExtractor(builder())
    return make


def _convnext_slim():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    cfg = [CNBlockConfig(24, 48, 1), CNBlockConfig(48, 96, 1), CNBlockConfig(96, 192, 2), CNBlockConfig(192, None, 1)]
    return ConvNeXt(cfg, stochastic_depth_prob=0.0).features


def _resnext_slim():
    from torchvision.models.resnet import Bottleneck, ResNet
    return resnet_trunk(ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4))


def _densenet_slim():
    from torchvision.models.densenet import DenseNet
    m = DenseNet(growth_rate=12, block_config=(2, 3, 4, 3), num_init_features=24, bn_size=4)
    return nn.Sequential(m.features, nn.ReLU())


def _inception_slim():
    """Inception v3's own blocks, few channels: the 5x5, 3x3-double and average-pool (padded,
    count_include_pad) branches, the strided reduction, and the factorised 1x7 / 7x1 convs."""
    from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC
    return nn.Sequential(
        BasicConv2d(3, 32, kernel_size=3, stride=2), nn.MaxPool2d(3, stride=2),
        InceptionA(32, pool_features=8),        # 64 + 64 + 96 + 8 = 232 channels
        InceptionB(232),                        # 384 + 96 + 232 = 712
        InceptionC(712, channels_7x7=16),       # 4 x 192 = 768
    )


def _googlenet_trunk(m):
    return seq(m, ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                   "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                   "inception5a", "inception5b"])


def _inception_trunk(m):
    return seq(m, ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                   "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"])


def tv_trunk(name, trunk, **kw):
    def make(size):
        return FeatureExtractor(trunk(tv(name, **kw)))
    return make


features_of = lambda m: m.features  # noqa: E731
# name -> (builder(size) -> FeatureExtractor, head kind, fixed input side or None, minimum side)
ARCHS = {
    "resnet18": (tv_trunk("resnet18", resnet_trunk), "gap", None, 32),
    "resnet50": (tv_trunk("resnet50", resnet_trunk), "gap", None, 32),
    "resnext50_32x4d": (tv_trunk("resnext50_32x4d", resnet_trunk), "gap", None, 32),
    "wide_resnet50_2": (tv_trunk("wide_resnet50_2", resnet_trunk), "gap", None, 32),
    "mobilenet_v2": (tv_trunk("mobilenet_v2", features_of), "gap", None, 32),
    "mobilenet_v3_small": (tv_trunk("mobilenet_v3_small", features_of), "gap", None, 32),
    "mobilenet_v3_large": (tv_trunk("mobilenet_v3_large", features_of), "gap", None, 32),
    "efficientnet_b0": (tv_trunk("efficientnet_b0", features_of), "gap", None, 32),
    "efficientnet_b3": (tv_trunk("efficientnet_b3", features_of), "gap", None, 32),
    "efficientnet_v2_s": (tv_trunk("efficientnet_v2_s", features_of), "gap", None, 32),
    "regnet_y_400mf": (tv_trunk("regnet_y_400mf", lambda m: seq(m, ["stem", "trunk_output"])), "gap", None, 32),
    "regnet_x_400mf": (tv_trunk("regnet_x_400mf", lambda m: seq(m, ["stem", "trunk_output"])), "gap", None, 32),
    "densenet121": (tv_trunk("densenet121", lambda m: nn.Sequential(m.features, nn.ReLU())), "gap", None, 32),
    "convnext_tiny": (tv_trunk("convnext_tiny", features_of), "gap", None, 32),
    "shufflenet_v2_x1_0": (tv_trunk("shufflenet_v2_x1_0", lambda m: seq(m, ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"])), "gap", None, 32),
    "shufflenet_v2_x0_5": (tv_trunk("shufflenet_v2_x0_5", lambda m: seq(m, ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"])), "gap", None, 32),
    "squeezenet1_1": (tv_trunk("squeezenet1_1", features_of), "gap", None, 32),
    "vgg11_bn": (tv_trunk("vgg11_bn", features_of), "gap", None, 32),
    "googlenet": (tv_trunk("googlenet", _googlenet_trunk, aux_logits=False, init_weights=True), "gap", None, 32),
    "inception_v3": (tv_trunk("inception_v3", _inception_trunk, aux_logits=False, init_weights=True), "gap", None, 75),
    "mnasnet1_0": (tv_trunk("mnasnet1_0", lambda m: m.layers), "gap", None, 32),
    "mobilefacenet": (mobilefacenet_like, "affine", 112, 112),
    "reid_resnet18": (reid_resnet18, "affine", None, 32),
    # Small configurations for the CI subset.
    "convnext_slim": (slim(_convnext_slim), "gap", None, 32),
    "resnext_slim": (slim(_resnext_slim), "gap", None, 32),
    "densenet_slim": (slim(_densenet_slim), "gap", None, 32),
    "inception_slim": (slim(_inception_slim), "gap", None, 48),
}
FULL = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
        "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b3", "efficientnet_v2_s", "regnet_y_400mf",
        "regnet_x_400mf", "densenet121", "convnext_tiny", "shufflenet_v2_x1_0", "squeezenet1_1", "vgg11_bn",
        "googlenet", "inception_v3", "mnasnet1_0", "mobilefacenet", "reid_resnet18"]
SUBSETS = {
    "full": (FULL, 224),
    # The test suite's set: every operator type of the full zoo (grouped and depthwise conv,
    # ReLU6 as Clip, squeeze-excitation, hard-swish, SiLU, channel shuffle, dense blocks,
    # inception branches (ceil-mode max pools, padded average pools, 1x7 / 7x1 convs),
    # LayerNorm / GELU / layer scale, Fire modules,
    # PReLU, affine heads), at 64 px, in small configurations where the real one is large.
    "ci": (["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet_slim", "convnext_slim",
            "shufflenet_v2_x0_5", "googlenet", "inception_slim", "squeezenet1_1", "regnet_y_400mf",
            "resnext_slim", "mobilefacenet", "reid_resnet18"], 64),
}


def randomise_batchnorm(model, size, seed):
    """Sets every BatchNorm from seeded random images: in one eval-mode pass, a hook gives each
    BatchNorm the mean and variance of its own input (the variance floored at a tenth of its
    median, so that no near-constant channel is blown up), then its affine parameters are drawn.
    No BatchNorm is the identity, activations keep a sane scale, and the float32 outputs stay
    well conditioned (onnxruntime and PyTorch agree to about 1e-6 relative)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    g = torch.Generator().manual_seed(seed + 1)

    def hook(bn, inputs):
        x = inputs[0].double()
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        var = torch.maximum(var, 0.1 * var.median())
        n = bn.num_features
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((var + 1e-6).to(bn.running_var.dtype))
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g) * 0.1)

    model.eval()
    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        with torch.no_grad():
            model(torch.randn(8, 3, size, size, generator=g))
    finally:
        for h in handles:
            h.remove()
    model.eval()


def build(arch, size):
    builder, head, fixed, _ = ARCHS[arch]
    side = fixed or size
    torch.manual_seed(0)
    model = builder(side)
    randomise_batchnorm(model, side, zlib.crc32(arch.encode()))
    model.eval()
    return model, head, side


# ---------------------------------------------------------------------------------------
# Export, reference, manifest.

def op_types(path):
    """Operator types of a model (its graph, subgraphs and local functions); a type from a
    domain other than the default one is written domain::Type."""
    m = onnx.load(path, load_external_data=False)
    found = set()

    def walk(graph):
        for n in graph.node:
            found.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)

    walk(m.graph)
    for f in m.functions:
        for n in f.node:
            found.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
    return sorted(found)


def opset_of(path):
    m = onnx.load(path, load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def batch_dim_is_dynamic(path):
    m = onnx.load(path, load_external_data=False)
    dims = [i.type.tensor_type.shape.dim[0] for i in m.graph.input if i.name == INPUT]
    return bool(dims) and not dims[0].HasField("dim_value")


def export_legacy(model, x, path, opset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), path, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT], output_names=[FEATURES, EMBEDDING],
            dynamic_axes={INPUT: {0: "batch"}, FEATURES: {0: "batch"}, EMBEDDING: {0: "batch"}})
    return None


def export_dynamo(model, x, path):
    """Dynamo export, weights in `<path>.data`; dynamic batch, else static (returns why)."""
    note = None
    kw = dict(dynamo=True, external_data=True, input_names=[INPUT], output_names=[FEATURES, EMBEDDING],
              verbose=False, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), path,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), **kw)
        except Exception as e:  # noqa: BLE001 - fall back to a static batch, and say why
            note = f"dynamic batch failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}); static batch {x.shape[0]}"
            for p in (path, path + ".data"):
                if os.path.exists(p):
                    os.remove(p)
            torch.onnx.export(model, (x,), path, **kw)
    scrub_stack_traces(path)
    if not os.path.exists(path + ".data"):
        # Small models may be written without external data; move the weights out so the
        # variant is what it says.
        m = onnx.load(path)
        onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + ".data", size_threshold=0)
    return note


def scrub_stack_traces(path):
    """Drops the Python stack traces the dynamo exporter writes into each node's metadata (they
    name this checkout's paths and this script's line numbers), so the file is the same bytes
    wherever and whenever it is exported. The weights (external data) are not touched."""
    m = onnx.load(path, load_external_data=False)
    changed = False
    for n in m.graph.node:
        keep = [p for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(n.metadata_props):
            del n.metadata_props[:]
            n.metadata_props.extend(keep)
            changed = True
    if changed:
        onnx.save(m, path)


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def rel(path, out):
    return os.path.relpath(path, out)


def make_entry(arch, variant, model, head, side, out, entries, x, torch_out):
    name = f"{arch}.{variant}"
    path = os.path.join(out, name + ".onnx")
    ref = {k: os.path.join(out, f"{name}.{k}.npy") for k in ("input", "features", "embedding")}
    exporter = "legacy" if variant.startswith("legacy") else "dynamo"
    external = variant == "dynamo_ext"
    entry = {
        "name": name, "arch": arch, "variant": variant, "exporter": exporter, "opset": None,
        "external_data": external, "file": rel(path, out),
        "data_file": rel(path + ".data", out) if external else None,
        "input": INPUT, "size": [side, side], "features": FEATURES, "embedding": EMBEDDING, "head": head,
        "feature_shape": list(torch_out[0].shape[1:]), "embedding_dim": int(torch_out[1].shape[1]),
        "dynamic_batch": None, "dynamic_batch_note": None,
        "ref_input": rel(ref["input"], out), "ref_features": rel(ref["features"], out),
        "ref_embedding": rel(ref["embedding"], out),
        "export_seconds": None, "file_bytes": None, "op_types": None,
        "ort_vs_torch_max_abs": None, "ort_vs_torch_max_rel": None, "error": None,
    }
    t = time.perf_counter()
    note = None
    if variant in ("legacy13", "legacy17"):
        note = export_legacy(model, x, path, int(variant[len("legacy"):]))
    elif variant == "dynamo_ext":
        note = export_dynamo(model, x, path)
    elif variant == "dynamo_inline":
        src = os.path.join(out, f"{arch}.dynamo_ext.onnx")
        if not os.path.exists(src):
            raise RuntimeError("needs the dynamo_ext variant (export it first)")
        m = onnx.load(src)  # with its external data
        onnx.save(m, path, save_as_external_data=False)
        note = (entries.get(f"{arch}.dynamo_ext") or {}).get("dynamic_batch_note")
    entry["export_seconds"] = round(time.perf_counter() - t, 3)
    onnx.checker.check_model(path)  # the path form: external data and large models allowed
    entry["opset"] = opset_of(path)
    entry["op_types"] = op_types(path)
    entry["dynamic_batch"] = batch_dim_is_dynamic(path)
    entry["dynamic_batch_note"] = note
    entry["file_bytes"] = os.path.getsize(path) + (os.path.getsize(path + ".data") if external else 0)
    entry["sha256"] = file_hashes(path, external)

    sess = ort_session(path)
    feats, emb = sess.run([FEATURES, EMBEDDING], {INPUT: x.numpy()})
    diffs, rels = [], []
    for o, r in ((feats, torch_out[0]), (emb, torch_out[1])):
        r = r.numpy()
        if o.shape != r.shape:
            raise RuntimeError(f"onnxruntime output shape {o.shape} != PyTorch {r.shape}")
        d = float(np.max(np.abs(o - r)))
        diffs.append(d)
        rels.append(d / max(float(np.max(np.abs(r))), 1e-12))
    entry["ort_vs_torch_max_abs"] = max(diffs)
    entry["ort_vs_torch_max_rel"] = max(rels)
    if max(rels) > 1e-3:
        raise RuntimeError(f"onnxruntime disagrees with PyTorch: max abs {max(diffs):.3g}, rel {max(rels):.3g}")
    if entry["dynamic_batch"]:
        f1, e1 = sess.run([FEATURES, EMBEDDING], {INPUT: x.numpy()[:1]})
        d1 = max(float(np.max(np.abs(f1 - feats[:1]))), float(np.max(np.abs(e1 - emb[:1]))))
        if d1 > 1e-3 * max(float(np.max(np.abs(feats))), 1.0):
            raise RuntimeError(f"batch 1 differs from batch 2's first row by {d1:.3g}")
    np.save(ref["input"], x.numpy())
    np.save(ref["features"], feats)
    np.save(ref["embedding"], emb)
    return entry


def files_of(entry, out):
    names = [entry["file"], entry["ref_input"], entry["ref_features"], entry["ref_embedding"]]
    if entry.get("data_file"):
        names.append(entry["data_file"])
    return [os.path.join(out, n) for n in names]


def file_hashes(path, external):
    """sha256 of the model file (and of its external data file)."""
    h = {os.path.basename(path): sha256(path)}
    if external:
        h[os.path.basename(path) + ".data"] = sha256(path + ".data")
    return h


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    global onnx, ort
    import onnx  # noqa: F811 - imported here so that bench-zoo.py can import the models alone
    import onnxruntime as ort  # noqa: F811

    # triton is left out of the venv on purpose (GPU kernels only): hush its warning.
    logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default models/zoo; models/zoo/ci for --subset ci)")
    ap.add_argument("--size", type=int, default=None, help="input side in pixels (default 224; 64 for --subset ci)")
    ap.add_argument("--models", default=None, help="comma-separated architectures (default: the subset's)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--subset", choices=sorted(SUBSETS), default="full")
    ap.add_argument("--force", action="store_true", help="export again what exists")
    ap.add_argument("--list", action="store_true", help="list the architectures and subsets, and exit")
    args = ap.parse_args()
    if args.list:
        for k, (names, size) in SUBSETS.items():
            print(f"{k} ({size} px): {', '.join(names)}")
        print("all:", ", ".join(ARCHS))
        return 0
    names, default_size = SUBSETS[args.subset]
    size = args.size or default_size
    out = args.out or os.path.join(ROOT, "models/zoo" if args.subset == "full" else f"models/zoo/{args.subset}")
    models = args.models.split(",") if args.models else names
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    for a in models:
        if a not in ARCHS:
            ap.error(f"unknown model {a!r} (known: {', '.join(ARCHS)})")
    # dynamo_inline is re-saved from dynamo_ext: make sure it comes after it.
    variants = [v for v in VARIANTS if v in variants]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    manifest_path = os.path.join(out, "zoo.json")
    old = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            doc = json.load(fh)
        if doc.get("zoo_version") == ZOO_VERSION:
            old = {e["name"]: e for e in doc["models"]}
        else:
            print(f"{manifest_path} is of zoo version {doc.get('zoo_version')}, not {ZOO_VERSION}: exporting again")
    entries = dict(old)
    t_all = time.perf_counter()
    for arch in models:
        todo = []
        for v in variants:
            name = f"{arch}.{v}"
            e = old.get(name)
            if (not args.force and e and not e.get("error") and e["size"][0] == (ARCHS[arch][2] or size)
                    and all(os.path.exists(p) for p in files_of(e, out))):
                if not e.get("sha256"):
                    e["sha256"] = file_hashes(os.path.join(out, e["file"]), bool(e.get("external_data")))
                print(f"ok      {name}")
                continue
            todo.append(v)
        if not todo:
            continue
        side = ARCHS[arch][2] or size
        if side < ARCHS[arch][3]:
            for v in todo:
                entries[f"{arch}.{v}"] = {"name": f"{arch}.{v}", "arch": arch, "variant": v,
                                          "error": f"needs an input side of at least {ARCHS[arch][3]} px"}
            continue
        try:
            model, head, side = build(arch, size)
            rng = np.random.default_rng(zlib.crc32(f"{arch}:{side}".encode()))
            x = torch.from_numpy(rng.standard_normal((2, 3, side, side)).astype(np.float32))
            with torch.no_grad():
                torch_out = [t.detach() for t in model(x)]
        except Exception as e:  # noqa: BLE001
            for v in todo:
                entries[f"{arch}.{v}"] = {"name": f"{arch}.{v}", "arch": arch, "variant": v,
                                          "error": f"building the model failed: {type(e).__name__}: {e}"}
            continue
        for v in todo:
            name = f"{arch}.{v}"
            print(f"export  {name} ...", flush=True)
            try:
                entries[name] = make_entry(arch, v, model, head, side, out, entries, x, torch_out)
                e = entries[name]
                print(f"        {e['export_seconds']:.1f} s, {e['file_bytes'] / 2**20:.1f} MiB, opset {e['opset']}, "
                      f"ORT vs PyTorch max abs diff {e['ort_vs_torch_max_abs']:.3g} (rel {e['ort_vs_torch_max_rel']:.2g})"
                      + ("" if e["dynamic_batch"] else ", static batch"), flush=True)
            except Exception as ex:  # noqa: BLE001 - one failure must not stop the zoo
                msg = f"{type(ex).__name__}: {str(ex).strip().splitlines()[0] if str(ex).strip() else ''}"
                print(f"        FAILED: {msg}", flush=True)
                traceback.print_exc(limit=3, file=sys.stderr)
                entries[name] = {"name": name, "arch": arch, "variant": v, "exporter":
                                 "legacy" if v.startswith("legacy") else "dynamo", "error": msg[:2000]}
            # Keep the manifest current, so an interrupted run loses nothing.
            write_manifest(manifest_path, entries, out)
    write_manifest(manifest_path, entries, out)
    summary(entries, models, variants, time.perf_counter() - t_all)
    return 1 if any(entries.get(f"{a}.{v}", {}).get("error") for a in models for v in variants) else 0


def write_manifest(path, entries, out):
    order = {a: i for i, a in enumerate(ARCHS)}
    rows = sorted(entries.values(), key=lambda e: (order.get(e["arch"], 999), e["arch"], VARIANTS.index(e["variant"])))
    rows = [{k: e.get(k) for k in ENTRY_KEYS} for e in rows]
    union = {}
    for e in rows:
        if e.get("op_types"):
            union.setdefault(e["exporter"], set()).update(e["op_types"])
    doc = {
        "generator": "scripts/make-zoo.py",
        "zoo_version": ZOO_VERSION,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__},
        "op_types_by_exporter": {k: sorted(v) for k, v in sorted(union.items())},
        "models": rows,
    }
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def summary(entries, models, variants, seconds):
    print()
    print(f"| model | variant | opset | size | features | emb | dyn batch | export s | MiB | ORT-PyTorch max abs | status |")
    print("|---|---|---:|---:|---|---:|---|---:|---:|---:|---|")
    tot_s = tot_b = 0.0
    for a in models:
        for v in variants:
            e = entries.get(f"{a}.{v}")
            if e is None:
                continue
            if e.get("error"):
                print(f"| {a} | {v} | | | | | | | | | FAILED: {e['error'][:100]} |")
                continue
            tot_s += e["export_seconds"] or 0
            tot_b += e["file_bytes"] or 0
            print(f"| {a} | {v} | {e['opset']} | {e['size'][0]} | {'x'.join(map(str, e['feature_shape']))} | "
                  f"{e['embedding_dim']} | {'yes' if e['dynamic_batch'] else 'no'} | {e['export_seconds']:.1f} | "
                  f"{e['file_bytes'] / 2**20:.1f} | {e['ort_vs_torch_max_abs']:.2g} | ok |")
    print(f"\nexport time (sum of the variants listed) {tot_s:.1f} s, files {tot_b / 2**20:.1f} MiB; "
          f"this run took {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
