use std::time::Duration;

use super::*;

#[test]
fn benchmark_names_parse_and_unknown_ones_are_named() {
    assert_eq!(
        parse_what("density,dispatch").unwrap(),
        vec!["density", "dispatch"]
    );
    assert_eq!(parse_what("all").unwrap().len(), BENCHMARKS.len());
    let err = parse_what("events").unwrap_err().to_string();
    assert!(err.contains("\"events\""), "{err}");
}

#[test]
fn percentiles_use_the_nearest_rank() {
    let samples = Samples::new((1..=100).rev().map(Duration::from_millis).collect());
    assert_eq!(samples.percentile(50.0), Duration::from_millis(50));
    assert_eq!(samples.percentile(99.0), Duration::from_millis(99));
    assert_eq!(samples.max(), Duration::from_millis(100));
    assert_eq!(fmt_count(200_000), "200,000");
    assert_eq!(fmt_duration(Duration::from_micros(812)), "812.0 us");
}

#[test]
fn generated_deployments_parse() {
    let digest = "ab".repeat(32);
    let text = deployment_text(
        "bench",
        &[
            WorkloadText {
                name: "w-0001",
                digest: &digest,
                config: &[("mode", "echo")],
            },
            WorkloadText {
                name: "w-0002",
                digest: &digest,
                config: &[],
            },
        ],
    );
    let parsed = lichen_agent::deployment::parse("bench.toml", &text, Path::new("/"))
        .expect("generated text is a valid deployment");
    assert_eq!(parsed.spec.workloads.len(), 2);
    assert_eq!(parsed.spec.workloads[0].config["mode"], "echo");
}
