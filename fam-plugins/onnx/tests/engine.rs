//! The ONNX graphs lowered onto fam's engine give onnxruntime's values: every operator
//! fixture (references written by scripts/make-onnx-fixtures.py), run both through the
//! rewrites and without them, and the real MobileFaceNet with its engine step counts.

mod common;
use common::{fixtures, npy, op_cases, rel_err};

use std::path::Path;

use fam_core::candle::Device;
use fam_plugin_onnx::graph::Graph;
use fam_plugin_onnx::lower;

#[test]
fn operator_fixtures_through_the_engine_match_onnxruntime() {
    let dir = fixtures().join("ops");
    let cases = op_cases(&dir);
    assert!(cases.len() >= 19, "{cases:?}");
    let mut failures = Vec::new();
    let mut native_total = 0;
    for case in &cases {
        let x_path = dir.join(format!("{case}.input.npy"));
        let y_path = dir.join(format!("{case}.expected.npy"));
        if !x_path.is_file() || !y_path.is_file() {
            continue; // fixtures that test loading, not values
        }
        let Ok(g) = Graph::load(&dir.join(format!("{case}.onnx")), &Device::Cpu) else {
            continue; // refusal fixtures are tested elsewhere
        };
        let (x, expected) = (npy(&x_path), npy(&y_path));
        let mut probe = x.dims().to_vec();
        probe[0] = 1;
        let plan = g.plan(&["y"]).unwrap();
        for rewrites in [true, false] {
            let run = || -> Result<(f32, usize), String> {
                let l = if rewrites {
                    lower::lower(&g, &plan, "x", &["y"], &probe)
                } else {
                    lower::lower_unoptimized(&g, &plan, "x", &["y"], &probe)
                }
                .map_err(|e| e.to_string())?;
                let y = l.program.run(&[x.clone()]).map_err(|e| e.to_string())?;
                if y[0].dims() != expected.dims() {
                    return Err(format!(
                        "shape {:?}, expected {:?}",
                        y[0].dims(),
                        expected.dims()
                    ));
                }
                Ok((rel_err(&y[0], &expected), l.native))
            };
            match run() {
                Ok((err, native)) if err < 1e-4 => {
                    native_total += native;
                    println!("{case} (rewrites {rewrites}): {err:.2e}, {native} nodes native")
                }
                Ok((err, _)) => failures.push(format!(
                    "{case} (rewrites {rewrites}): relative error {err}"
                )),
                Err(e) => failures.push(format!("{case} (rewrites {rewrites}): {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        native_total >= 20,
        "the engine ran only {native_total} fixture nodes natively"
    );
}

#[test]
fn mobilefacenet_runs_on_engine_kernels() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fetched/mobilefacenet.onnx");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    let g = Graph::load(&p, &Device::Cpu).unwrap();
    let plan = g.plan(&["507", "output"]).unwrap();
    let l = lower::lower(&g, &plan, "input", &["507", "output"], &[1, 3, 112, 112]).unwrap();
    let (steps, native) = l.program.counts();
    println!("{}", lower::describe(&l, &p));
    println!("{:?}", l.program.summary());
    // Every convolution, BatchNorm and PReLU-free activation is native; the head's
    // Flatten/Gemm-style tail may be interpreted.
    assert!(native * 10 >= steps * 8, "{native} of {steps} steps native");
    let x = npy(&fixtures().join("mobilefacenet.ref.input.npy"));
    let out = l.program.run(&[x]).unwrap();
    let maps_err = rel_err(&out[0], &npy(&fixtures().join("mobilefacenet.ref.507.npy")));
    let emb_err = rel_err(
        &out[1],
        &npy(&fixtures().join("mobilefacenet.ref.output.npy")),
    );
    println!("feature map 507: {maps_err:.2e}, embedding: {emb_err:.2e}");
    assert!(maps_err < 1e-4 && emb_err < 1e-4, "{maps_err} {emb_err}");
}
