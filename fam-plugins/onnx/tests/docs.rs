//! docs/performance.md lists the supported ONNX operators exactly as the code has them.

use std::path::Path;

#[test]
fn the_operator_list_in_the_docs_is_the_codes() {
    for op in fam_plugin_onnx::lower::NATIVE {
        assert!(
            fam_plugin_onnx::ops::SUPPORTED.contains(op),
            "engine operator `{op}` is not in ops::SUPPORTED"
        );
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/performance.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- operators:begin -->\n", "<!-- operators:end -->");
    let start = text
        .find(begin)
        .expect("docs/performance.md has no operators:begin marker")
        + begin.len();
    let stop = text[start..].find(end).expect("no operators:end marker") + start;
    let want = fam_plugin_onnx::lower::operators_markdown();
    assert_eq!(
        &text[start..stop],
        want,
        "docs/performance.md's operator list is out of date; replace it with:\n{want}"
    );
}
