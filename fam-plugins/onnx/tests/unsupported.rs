//! A model with operators fam cannot run is refused when it is loaded (so `fam-cli validate`
//! reports it too), with every unsupported operator and its node count in one line.

use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, ValueInfoProto};
use fam_core::candle::Device;
use fam_core::plugin::BackboneConfig;
use fam_plugin_onnx::graph::Graph;
use prost::Message;

fn node(op: &str, domain: &str, i: usize) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        domain: domain.into(),
        name: format!("{op}_{i}"),
        input: vec![if i == 0 {
            "x".into()
        } else {
            format!("v{}", i - 1)
        }],
        output: vec![format!("v{i}")],
        ..Default::default()
    }
}

fn model(ops: &[(&str, &str)]) -> Vec<u8> {
    let nodes: Vec<NodeProto> = ops
        .iter()
        .enumerate()
        .map(|(i, (op, domain))| node(op, domain, i))
        .collect();
    let last = format!("v{}", ops.len() - 1);
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: nodes,
            input: vec![ValueInfoProto {
                name: "x".into(),
                ..Default::default()
            }],
            output: vec![ValueInfoProto {
                name: last,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn every_unsupported_operator_is_reported_at_once_with_its_count() {
    let bytes = model(&[
        ("Relu", ""),
        ("Foo", ""),
        ("Bar", ""),
        ("Foo", ""),
        ("Sigmoid", "ai.onnx"),
        ("Foo", ""),
        ("FusedConv", "com.microsoft"),
    ]);
    let e = Graph::from_bytes(&bytes, std::path::Path::new("model.onnx"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "model.onnx: weights: 3 operators are not supported: `Foo` (3 nodes), `Bar` (1 node), `com.microsoft.FusedConv` (1 node); supported: Abs, Add, "
        ),
        "{e}"
    );
    assert!(e.contains("Relu") && e.ends_with("Where, Xor"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let one = model(&[("Relu", ""), ("Einsum", "")]);
    let e = Graph::from_bytes(&one, std::path::Path::new("m.onnx"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 operator is not supported: `Einsum` (1 node); supported: "),
        "{e}"
    );
    // Many distinct operators: the first 20 are listed.
    let names: Vec<String> = (0..30).map(|i| format!("Op{i:02}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
    let e = Graph::from_bytes(&model(&many), std::path::Path::new("m.onnx"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("30 operators are not supported: `Op00` (1 node), ")
            && e.contains("`Op19` (1 node), and 10 more; supported: ")
            && !e.contains("Op20"),
        "{e}"
    );
    // All supported: it loads.
    assert!(Graph::from_bytes(
        &model(&[("Relu", ""), ("Sigmoid", "")]),
        std::path::Path::new("ok.onnx"),
        &Device::Cpu
    )
    .is_ok());
}

#[test]
fn validation_reports_unsupported_operators() {
    let dir = std::env::temp_dir().join(format!("fam-onnx-unsupported-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.onnx");
    std::fs::write(&path, model(&[("Relu", ""), ("Foo", ""), ("Foo", "")])).unwrap();
    let cfg = BackboneConfig {
        kind: "onnx".into(),
        weights: Some(path),
        layer: Some("v0".into()),
        options: Default::default(),
    };
    let problems: Vec<String> = fam_plugin_onnx::validate_config(&cfg)
        .iter()
        .map(|p| p.to_string())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("1 operator is not supported: `Foo` (2 nodes)")),
        "{problems:?}"
    );
}
