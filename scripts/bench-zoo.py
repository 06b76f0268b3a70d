#!/usr/bin/env python3
"""Times fam against onnxruntime, PyTorch and pytorch-grad-cam on the models of the ONNX zoo
(scripts/make-zoo.py), side by side, in one run.

    PY=$(scripts/zoo-env.sh | tail -n1)
    $PY scripts/make-zoo.py                         # models/zoo/ (224 px)
    $PY scripts/bench-zoo.py [--models resnet18,mobilenet_v2] [--count 32] [--repeat 3] [--json OUT]

For each model (the zoo file of --variant, default legacy17), with --threads threads (default 2)
everywhere (torch.set_num_threads, onnxruntime's intra_op_num_threads, and every process pinned
to that many CPUs, which is what fam's thread pools follow), per-image milliseconds, medians of
--repeat runs after one warm-up run, at each of --batch-sizes (default 1,16), over --count
copies of the images in --images (cycled; pairs are image 2i with image 2i+1):

- onnxruntime forward: the zoo file, CPUExecutionProvider, preprocessed tensors in memory;
- PyTorch forward: the same network (rebuilt from make-zoo.py, same weights), no gradient;
- Grad-CAM: pytorch-grad-cam's GradCAM, target layer the last feature layer (the trunk's
  output, the zoo's `features`), target the cosine similarity to the pair partner's embedding
  (SimilarityToConceptTarget, as in its embeddings tutorial). *explain*: forward, backward,
  CAM and its upsampling; *end to end*: also decoding and preprocessing with PIL and
  torchvision, and one overlay PNG per map (show_cam_on_image, saved by PIL), as
  scripts/bench-peers.py does;
- fam: `fam-cli bench` on a temporary pipeline with the `onnx` backbone on the same zoo file,
  layer `features` (embedding "gap", or "output" through the affine head of the face/re-id
  nets), cosine similarity, one overlay PNG per map. Skipped when --fam is missing (not built
  here: `cargo build --release`).

With --device cuda (a build from scripts/build-cuda.sh, default --fam target/cuda/release/fam-cli)
PyTorch, Grad-CAM and fam run on the GPU, every process may use every CPU (decoding runs on the
host), and onnxruntime (CPU only here) is left out; PyTorch computes in plain FP32 (TF32 off
for convolutions and matrix products), as fam does. CUDA timings synchronize the device.

Every Python peer runs in its own process, so its peak resident memory (getrusage) is its own;
fam reports its own (peak_rss_mib). Preprocessing is fam's for an onnx backbone: an exact
resize to the model's input size and ImageNet mean/std. Prints a markdown table per batch size
with geometric means; --json writes every number.
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PEERS = ["onnxruntime", "pytorch", "grad_cam"]


def median_ms(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def chunks(xs, n):
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def image_paths(folder, count):
    files = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    if not files:
        raise SystemExit(f"no images in {folder}")
    return [files[i % len(files)] for i in range(max(2, (count // 2) * 2))]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def load_make_zoo():
    spec = importlib.util.spec_from_file_location("make_zoo", os.path.join(ROOT, "scripts", "make-zoo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------
# Workers: one Python peer, one model, in this process. Prints one JSON line.

def worker(args):
    import numpy as np
    from PIL import Image

    entry = json.loads(args.worker_entry)
    zoo = args.zoo
    h, w = entry["size"]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    paths = image_paths(args.images, args.count)
    n = len(paths)
    result = {"tool": args.worker, "batch": {}}

    if args.worker == "onnxruntime":
        # No torch in this process (its peak memory is onnxruntime's): the same preprocessing
        # as torchvision's Resize((h, w)) + ToTensor + Normalize on a PIL image, in numpy.
        import onnxruntime as ort

        mean = np.array(MEAN, dtype=np.float32)[:, None, None]
        std = np.array(STD, dtype=np.float32)[:, None, None]

        def load_np(p):
            a = np.asarray(Image.open(p).convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255
            return (a.transpose(2, 0, 1) - mean) / std

        result["decode_ms"] = median_ms(lambda: [load_np(p) for p in paths], args.repeat) / n
        xs = np.stack([load_np(p) for p in paths]).astype(np.float32)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(os.path.join(zoo, entry["file"]), so, providers=["CPUExecutionProvider"])
        for bs in batch_sizes:
            fwd = median_ms(lambda: [sess.run(None, {entry["input"]: b}) for b in chunks(xs, bs)], args.repeat) / n
            result["batch"][bs] = {"forward": fwd}
        result["version"] = ort.__version__
    else:
        import torch
        import torchvision

        torch.set_num_threads(args.threads)
        dev = torch.device(args.device)
        if dev.type == "cuda":
            # fam computes in FP32; PyTorch's convolutions would use TF32 by default.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
            result["gpu"] = torch.cuda.get_device_name(dev)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        tf = torchvision.transforms.Compose([
            torchvision.transforms.Resize((h, w)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(MEAN, STD),
        ])

        def load(p):
            return tf(Image.open(p).convert("RGB"))

        result["decode_ms"] = median_ms(lambda: [load(p) for p in paths], args.repeat) / n
        x = torch.stack([load(p) for p in paths])
        mz = load_make_zoo()
        model, _, side = mz.build(entry["arch"], h)
        if side != h:
            raise SystemExit(f"{entry['arch']}: make-zoo.py builds it at {side} px, the zoo file is {h} px")
        # The rebuilt network must be the zoo file's (same seed, same BatchNorm statistics).
        ref_x = torch.from_numpy(np.load(os.path.join(zoo, entry["ref_input"])))
        with torch.no_grad():
            ref_e = model(ref_x)[1].numpy()
        want = np.load(os.path.join(zoo, entry["ref_embedding"]))
        result["max_abs_diff_to_zoo_reference"] = float(np.max(np.abs(ref_e - want)))
        if result["max_abs_diff_to_zoo_reference"] > 1e-3 * max(1.0, float(np.max(np.abs(want)))):
            raise SystemExit(f"{entry['arch']}: the rebuilt PyTorch model differs from the zoo reference "
                             f"by {result['max_abs_diff_to_zoo_reference']:.3g}")
        model = model.to(dev)
        x = x.to(dev)
        if args.worker == "pytorch":
            for bs in batch_sizes:
                def forward():
                    with torch.no_grad():
                        [model(b) for b in chunks(x, bs)]
                    sync()
                result["batch"][bs] = {"forward": median_ms(forward, args.repeat) / n}
        else:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.image import show_cam_on_image

            class Embedding(torch.nn.Module):
                def __init__(self, net):
                    super().__init__()
                    self.net = net

                def forward(self, inp):
                    return self.net(inp)[1]

            class SimilarityToConceptTarget:
                """The cosine-similarity target of pytorch-grad-cam's embeddings tutorial."""

                def __init__(self, features):
                    self.features = features

                def __call__(self, model_output):
                    return torch.nn.functional.cosine_similarity(model_output, self.features, dim=0)

            emb_model = Embedding(model).eval()
            with torch.no_grad():
                emb = emb_model(x)
            partner = torch.stack([emb[i ^ 1] for i in range(n)])
            cam = GradCAM(model=emb_model, target_layers=[model.trunk])
            out_dir = tempfile.mkdtemp(prefix="bench-zoo-gradcam-")

            def cams(batch, refs):
                return cam(input_tensor=batch, targets=[SimilarityToConceptTarget(r) for r in refs])

            try:
                for bs in batch_sizes:
                    explain = median_ms(
                        lambda: [cams(b, r) for b, r in zip(chunks(x, bs), chunks(partner, bs))], args.repeat) / n

                    def end_to_end():
                        for ids, refs in zip(chunks(list(range(n)), bs), chunks(partner, bs)):
                            maps = cams(torch.stack([load(paths[i]) for i in ids]).to(dev), refs)
                            for i, m in zip(ids, maps):
                                rgb = Image.open(paths[i]).convert("RGB").resize((w, h), Image.BILINEAR)
                                over = show_cam_on_image(np.asarray(rgb, dtype=np.float32) / 255, m, use_rgb=True)
                                Image.fromarray(over).save(os.path.join(out_dir, f"{i}.png"))

                    result["batch"][bs] = {"explain": explain, "end_to_end": median_ms(end_to_end, args.repeat) / n}
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        result["version"] = torch.__version__
    result["images"] = n
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------
# The driver.

def pin(threads):
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return lambda: os.sched_setaffinity(0, cpus)


def run_peer(tool, entry, args, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tool, "--worker-entry", json.dumps(entry),
           "--zoo", args.zoo, "--images", args.images, "--count", str(args.count), "--repeat", str(args.repeat),
           "--batch-sizes", args.batch_sizes, "--threads", str(args.threads), "--device", args.device]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pin(args.threads))
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:500]}"}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.perf_counter() - t
    return r


FAM_PIPELINE = """\
# Written by scripts/bench-zoo.py for `fam-cli bench` (the task is replaced by pairs).
[run]
batch_size = 16
output = {out}

[backbone]
plugin = "onnx"
kind = "onnx"
weights = {weights}
layer = {layer}

[backbone.options]
input = {input}
embedding = {embedding}
{output_line}size = [{h}, {w}]

[similarity]
plugin = "metrics"
kind = "cosine"

[task]
kind = "pair"
pairs = [{{ a = {a}, b = {b} }}]

[[render]]
plugin = "render"
kind = "overlay"
"""


def toml_str(s):
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def run_fam(entry, args, env, scratch):
    if not os.path.exists(args.fam):
        build = "scripts/build-cuda.sh" if args.device != "cpu" else "cargo build --release"
        return {"error": f"{args.fam} is missing ({build})", "skipped": True}
    paths = image_paths(args.images, 2)
    affine = entry["head"] == "affine"
    toml = FAM_PIPELINE.format(
        out=toml_str(os.path.join(scratch, "out")), weights=toml_str(os.path.join(os.path.abspath(args.zoo), entry["file"])),
        layer=toml_str(entry["features"]), input=toml_str(entry["input"]),
        embedding=toml_str("output" if affine else "gap"),
        output_line=f"output = {toml_str(entry['embedding'])}\n" if affine else "",
        h=entry["size"][0], w=entry["size"][1], a=toml_str(os.path.abspath(paths[0])), b=toml_str(os.path.abspath(paths[1])))
    pipeline = os.path.join(scratch, f"{entry['name']}.toml")
    with open(pipeline, "w") as fh:
        fh.write(toml)
    cmd = [args.fam, "-q", "bench", pipeline, "--images", args.images, "--count", str(args.count),
           "--batch-sizes", args.batch_sizes, "--repeat", str(args.repeat), "--device", args.device, "--json"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=pin(args.threads))
    if p.returncode != 0:
        msg = " ".join((p.stderr.strip() or p.stdout.strip() or "(no output)").splitlines()[-3:])
        return {"error": f"exit {p.returncode}: {msg[:800]}", "pipeline": toml}
    rep = json.loads(p.stdout)
    out = {"batch": {}, "threads": rep.get("threads"), "load_models_ms": rep.get("load_models_ms"),
           "backbone": rep.get("backbone"), "wall_s": time.perf_counter() - t}
    for row in rep["rows"]:
        out["batch"][row["batch_size"]] = {
            "decode": row["decode_preprocess_ms"], "forward": row["forward_ms"], "explain": row["fam_ms"],
            "render": row["render_ms"], "end_to_end": row["end_to_end_ms"], "peak_rss_mib": row.get("peak_rss_mib"),
        }
    out["peak_rss_mib"] = max((r.get("peak_rss_mib") or 0) for r in out["batch"].values()) or None
    return out


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def print_tables(results, batch_sizes):
    for bs in batch_sizes:
        print(f"\n### batch {bs} (per-image ms; peak MiB over the whole run)\n")
        cols = ["ORT fwd", "PyTorch fwd", "Grad-CAM explain", "Grad-CAM end to end", "fam fwd", "fam end to end",
                "fam/ORT", "fam/PyTorch", "Grad-CAM/fam", "fam peak MiB", "ORT MiB", "PyTorch MiB", "Grad-CAM MiB"]
        print("| model | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        table = []
        for name, r in results.items():
            def get(tool, key):
                t = r.get(tool) or {}
                return (t.get("batch") or {}).get(str(bs), (t.get("batch") or {}).get(bs, {})).get(key)

            ort_f, pt_f = get("onnxruntime", "forward"), get("pytorch", "forward")
            gc_x, gc_e = get("grad_cam", "explain"), get("grad_cam", "end_to_end")
            fam_f, fam_e = get("fam", "forward"), get("fam", "end_to_end")
            row = [ort_f, pt_f, gc_x, gc_e, fam_f, fam_e,
                   fam_f / ort_f if fam_f and ort_f else None, fam_f / pt_f if fam_f and pt_f else None,
                   gc_e / fam_e if gc_e and fam_e else None,
                   (r.get("fam") or {}).get("peak_rss_mib"), (r.get("onnxruntime") or {}).get("peak_rss_mib"),
                   (r.get("pytorch") or {}).get("peak_rss_mib"), (r.get("grad_cam") or {}).get("peak_rss_mib")]
            table.append(row)
            cells = [fmt(v) for v in row[:6]] + [fmt(v) + ("x" if v else "") for v in row[6:9]] + [fmt(v, 0) for v in row[9:]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        if table:
            g = [geomean([t[i] for t in table]) for i in range(len(cols))]
            cells = [fmt(v) for v in g[:6]] + [fmt(v) + ("x" if v else "") for v in g[6:9]] + [fmt(v, 0) for v in g[9:]]
            print("| **geomean** | " + " | ".join(cells) + " |")
    errors = [(name, tool, r[tool]["error"]) for name, r in results.items() for tool in r
              if isinstance(r[tool], dict) and r[tool].get("error") and not r[tool].get("skipped")]
    skipped = sorted({r[t]["error"] for r in results.values() for t in r if isinstance(r[t], dict) and r[t].get("skipped")})
    if errors or skipped:
        print()
    for e in skipped:
        print(f"- fam skipped: {e}")
    for name, tool, e in errors:
        print(f"- {name} / {tool}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default=os.path.join(ROOT, "models/zoo"), help="zoo folder (with zoo.json)")
    ap.add_argument("--variant", default="legacy17", help="which zoo file of each model")
    ap.add_argument("--models", help="comma-separated architectures (default: every model of the zoo)")
    ap.add_argument("--images", default=os.path.join(ROOT, "data/images"))
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=None, help="default 2, or every CPU with --device cuda")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (PyTorch, Grad-CAM and fam on the GPU)")
    ap.add_argument("--tools", default=None, help="default onnxruntime,pytorch,grad_cam,fam (no onnxruntime on cuda)")
    ap.add_argument("--fam", default=None, help="default target/release/fam-cli, target/cuda/release/fam-cli on cuda")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-entry", help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device != "cpu"
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if gpu else 2
    if args.tools is None:
        args.tools = "pytorch,grad_cam,fam" if gpu else "onnxruntime,pytorch,grad_cam,fam"
    if args.fam is None:
        args.fam = os.path.join(ROOT, "target/cuda/release/fam-cli" if gpu else "target/release/fam-cli")
    if args.worker:
        return worker(args)

    with open(os.path.join(args.zoo, "zoo.json")) as fh:
        manifest = json.load(fh)
    entries = [e for e in manifest["models"] if e["variant"] == args.variant and not e.get("error")]
    if args.models:
        wanted = args.models.split(",")
        missing = [m for m in wanted if m not in {e["arch"] for e in entries}]
        if missing:
            raise SystemExit(f"not in {args.zoo} as {args.variant}: {', '.join(missing)}")
        entries = [e for e in entries if e["arch"] in wanted]
    tools = args.tools.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads))
    results = {}
    scratch = tempfile.mkdtemp(prefix="bench-zoo-")
    try:
        for e in entries:
            r = results.setdefault(e["arch"], {"file": e["file"], "size": e["size"], "head": e["head"]})
            for tool in tools:
                t = time.perf_counter()
                if tool == "fam":
                    r["fam"] = run_fam(e, args, env, scratch)
                elif tool in PEERS:
                    r[tool] = run_peer(tool, e, args, env)
                else:
                    raise SystemExit(f"unknown tool {tool!r}")
                status = r[tool].get("error") or "ok"
                print(f"{e['arch']:<22} {tool:<12} {time.perf_counter() - t:6.1f} s  {status}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n = len(image_paths(args.images, args.count))
    gpus = sorted({t.get("gpu") for r in results.values() for t in r.values() if isinstance(t, dict) and t.get("gpu")})
    print(f"{n} images, {args.threads} threads, device {args.device}{' (' + ', '.join(gpus) + ')' if gpus else ''}, "
          f"{args.variant} zoo files, per-image ms (median of {args.repeat} after a warm-up)")
    print_tables(results, batch_sizes)
    if args.json:
        doc = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "cpus": os.cpu_count(), "device": args.device, "gpu": gpus},
               "images": n, "repeat": args.repeat, "variant": args.variant, "zoo": args.zoo,
               "versions": manifest.get("versions"), "models": results}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
