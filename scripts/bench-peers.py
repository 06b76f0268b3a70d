#!/usr/bin/env python3
"""Times fam against the Python tools on the same CPU, images and model, in one run.

MobileNetV2 (torchvision ImageNet weights, the checkpoint scripts/fetch-models.sh fetches),
224 px, cosine similarity between pairs of images (image 2i with 2i+1), batch sizes 1 and 16:

- fam:          `fam-cli bench pipelines/bench-mobilenet.toml` (decode, forward, FAM, one
                overlay PNG per map);
- onnxruntime:  the forward pass of the same network exported to ONNX;
- PyTorch:      the forward pass (no gradient);
- Grad-CAM:     pytorch-grad-cam's GradCAM on features[-1] with a cosine-similarity target
                (SimilarityToConceptTarget, as in its embeddings tutorial) against the pair partner's embedding; end to end
                it also decodes the images and writes one overlay PNG per map, like fam.

Each peer is measured only where its package is installed. Prints a table of per-image
milliseconds (medians of --repeat runs after one warm-up) and the ratios; --json writes them.

    python3 scripts/bench-peers.py [--images data/images] [--count 32] [--repeat 3]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=os.path.join(ROOT, "data/images"))
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fam", default=os.path.join(ROOT, "target/release/fam-cli"))
    ap.add_argument("--pth", default=os.path.join(ROOT, "models/fetched/mobilenet_v2-b0353104.pth"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    files = sorted(
        os.path.join(args.images, f)
        for f in os.listdir(args.images)
        if f.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    paths = [files[i % len(files)] for i in range((args.count // 2) * 2)]
    n = len(paths)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads}, "images": n, "batch": {}}

    # fam, in its own process (models loaded once there).
    fam = subprocess.run(
        [args.fam, "-q", "bench", os.path.join(ROOT, "pipelines/bench-mobilenet.toml"),
         "--images", args.images, "--count", str(n), "--repeat", str(args.repeat),
         "--batch-sizes", args.batch_sizes, "--json"],
        check=True, capture_output=True, text=True,
    )
    fam = json.loads(fam.stdout)
    for row in fam["rows"]:
        results["batch"].setdefault(row["batch_size"], {})["fam"] = {
            "decode": row["decode_preprocess_ms"], "forward": row["forward_ms"],
            "explain": row["fam_ms"], "render": row["render_ms"], "end_to_end": row["end_to_end_ms"],
        }

    try:
        import numpy as np
        import torch
        import torchvision
        from PIL import Image
    except ImportError as e:
        print(f"PyTorch peers skipped: {e}", file=sys.stderr)
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        net = torchvision.models.mobilenet_v2()
        net.load_state_dict(torch.load(args.pth, map_location="cpu", weights_only=True))
        model = torch.nn.Sequential(net.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
        tf = torchvision.transforms.Compose([
            torchvision.transforms.Resize(256),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

        def load(p):
            return tf(Image.open(p).convert("RGB"))

        decode_ms = median_ms(lambda: [load(p) for p in paths], args.repeat) / n
        x = torch.stack([load(p) for p in paths])
        with torch.no_grad():
            emb = model(x)
        partner = torch.stack([emb[i ^ 1] for i in range(n)])

        ort_session = None
        try:
            import onnxruntime as ort

            onnx_path = os.path.join(tempfile.mkdtemp(), "mobilenet_v2.onnx")
            kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
            torch.onnx.export(model, x[:1], onnx_path, input_names=["x"], output_names=["e"],
                              dynamic_axes={"x": {0: "b"}, "e": {0: "b"}}, opset_version=17, **kw)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            ort_session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - report and go on without this peer
            print(f"onnxruntime skipped: {e}", file=sys.stderr)

        try:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.image import show_cam_on_image

            class SimilarityToConceptTarget:
                """The cosine-similarity target of pytorch-grad-cam's embeddings tutorial."""

                def __init__(self, features):
                    self.features = features

                def __call__(self, model_output):
                    return torch.nn.functional.cosine_similarity(model_output, self.features, dim=0)
        except ImportError as e:
            print(f"pytorch-grad-cam skipped: {e}", file=sys.stderr)
            GradCAM = None
        out_dir = tempfile.mkdtemp()

        for bs in batch_sizes:
            r = results["batch"].setdefault(bs, {})
            with torch.no_grad():
                r["pytorch"] = {"forward": median_ms(lambda: [model(b) for b in chunks(x, bs)], args.repeat) / n}
            if ort_session is not None:
                xs = x.numpy()
                r["onnxruntime"] = {"forward": median_ms(
                    lambda: [ort_session.run(None, {"x": b}) for b in chunks(xs, bs)], args.repeat) / n}
            if GradCAM is not None:
                cam = GradCAM(model=model, target_layers=[model[0][-1]])

                def cams(batch, refs):
                    return cam(input_tensor=batch, targets=[SimilarityToConceptTarget(rf) for rf in refs])

                explain = median_ms(
                    lambda: [cams(b, rf) for b, rf in zip(chunks(x, bs), chunks(partner, bs))], args.repeat) / n

                def end_to_end():
                    for ps, rf in zip(chunks(list(range(n)), bs), chunks(partner, bs)):
                        imgs = [load(paths[i]) for i in ps]
                        maps = cams(torch.stack(imgs), rf)
                        for i, m in zip(ps, maps):
                            rgb = Image.open(paths[i]).convert("RGB")
                            rgb = torchvision.transforms.CenterCrop(224)(torchvision.transforms.Resize(256)(rgb))
                            over = show_cam_on_image(np.asarray(rgb, dtype=np.float32) / 255, m, use_rgb=True)
                            Image.fromarray(over).save(os.path.join(out_dir, f"{i}.png"))

                r["grad_cam"] = {"explain": explain, "end_to_end": median_ms(end_to_end, args.repeat) / n}
        shutil.rmtree(out_dir, ignore_errors=True)
        results["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__}
        if ort_session is not None:
            results["versions"]["onnxruntime"] = ort.__version__
    results["decode_pytorch"] = decode_ms if torch is not None else None

    print(f"{n} images, {args.threads} threads, per-image ms (median of {args.repeat})")
    print(f"{'batch':>5} {'fam fwd':>8} {'ort fwd':>8} {'torch fwd':>9} {'fam e2e':>8} {'gradcam e2e':>11} "
          f"{'fam expl':>8} {'fwd/ort':>8} {'gradcam/fam':>11} {'fam/fwd':>8}")
    for bs in batch_sizes:
        r = results["batch"][bs]
        f = r["fam"]
        ort_fwd = r.get("onnxruntime", {}).get("forward")
        gc = r.get("grad_cam", {})
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
        r["ratios"] = {
            "fam_forward_over_onnxruntime": f["forward"] / ort_fwd if ort_fwd else None,
            "grad_cam_end_to_end_over_fam": gc["end_to_end"] / f["end_to_end"] if gc else None,
            "fam_explain_share_of_forward": f["explain"] / f["forward"],
        }
        fmt = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        print(f"{bs:>5} {f['forward']:>8.2f} {fmt(ort_fwd):>8} {fmt(r.get('pytorch', {}).get('forward')):>9} "
              f"{f['end_to_end']:>8.2f} {fmt(gc.get('end_to_end')):>11} {f['explain']:>8.3f} "
              f"{ratio(f['forward'], ort_fwd):>8} {ratio(gc.get('end_to_end'), f['end_to_end']):>11} "
              f"{100 * f['explain'] / f['forward']:>7.2f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
